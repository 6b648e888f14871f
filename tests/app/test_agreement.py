"""Dice of a UniSeg label map against TotalSegmentator's map of the same scan: organs, label values, grids."""

import ast
import tarfile

import nibabel as nib
import numpy as np
import pytest

from uniseg_hub.app import sample_data
from uniseg_hub.app.agreement import (
    ORGANS,
    TOTALSEGMENTATOR_CLASSES,
    agreement,
    agreement_files,
    align,
    organ_values,
)
from uniseg_hub.errors import InputError
from uniseg_hub.tasks import get_task

from scans import sample

TOTAL = TOTALSEGMENTATOR_CLASSES["total"]


def box(shape, *slices, value=1, dtype=np.uint8):
    out = np.zeros(shape, dtype)
    out[slices] = value
    return out


def numpy_dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_identical_organ_gives_one_and_the_volumes():
    reference = box((20, 20, 20), slice(4, 12), slice(4, 12), slice(4, 12), value=TOTAL["liver"])
    ours = (reference > 0).astype(np.uint8)  # the liver task's label 1
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    [row] = agreement(ours, affine, reference, affine, "liver", case="c")
    assert (row.case, row.task, row.organ, row.dice) == ("c", "liver", "liver", 1.0)
    assert row.volume_ml == row.reference_volume_ml == pytest.approx(512 * 1.5 * 1.5 * 3.0 / 1000)


@pytest.mark.parametrize("shift", [1, 2, 5])
def test_shifted_organ_gives_the_overlap_dice(shift):
    reference = box((24, 20, 20), slice(4, 12), slice(4, 12), slice(4, 12), value=TOTAL["spleen"])
    ours = np.roll(reference > 0, shift, axis=0).astype(np.uint8)
    [row] = agreement(ours, np.eye(4), reference, np.eye(4), "spleen")
    # an 8-voxel edge moved by `shift` keeps (8 - shift) / 8 of the box: Dice = (8 - shift) / 8
    assert row.dice == pytest.approx((8 - shift) / 8)


def test_tumour_label_is_not_organ_and_kidney_is_both_sides_with_cysts():
    reference = np.zeros((30, 20, 20), np.uint8)
    reference[2:8, 4:10, 4:10] = TOTAL["kidney_right"]
    reference[20:26, 4:10, 4:10] = TOTAL["kidney_left"]
    reference[20:26, 10:12, 4:10] = TOTAL["kidney_cyst_left"]
    ours = np.isin(reference, [TOTAL["kidney_right"], TOTAL["kidney_left"], TOTAL["kidney_cyst_left"]])
    ours = ours.astype(np.uint8)
    assert agreement(ours, np.eye(4), reference, np.eye(4), "kidney")[0].dice == 1.0
    ours[2:8, 4:10, 4:7] = 2  # half the right kidney called tumour: no longer counted as kidney
    expected = numpy_dice(ours == 1, np.isin(reference, [2, 3, 23]))
    assert agreement(ours, np.eye(4), reference, np.eye(4), "kidney")[0].dice == pytest.approx(expected)
    assert expected < 1


def test_all_tasks_map_uses_the_merged_values():
    names = {"liver": "liver", "kidney": "kidney_left", "pancreas": "pancreas", "spleen": "spleen"}
    reference = np.zeros((40, 10, 10), np.uint8)
    ours = np.zeros_like(reference)
    for i, (task, organ) in enumerate(names.items()):
        reference[i * 10:i * 10 + 6, 2:8, 2:8] = TOTAL[organ]
        ours[i * 10:i * 10 + 6, 2:8, 2:8] = get_task(task).merged_labels[0]
    assert dict(organ_values("all")) == {o: get_task(o.task).merged_labels[0] for o in ORGANS if o.task in names}
    assert {o.name: v for o, v in organ_values("all")} == {"liver": 1, "kidney": 3, "pancreas": 7, "spleen": 11}
    rows = agreement(ours, np.eye(4), reference, np.eye(4), "all")
    assert [(r.task, r.organ, r.dice) for r in rows] == [("all", t, 1.0) for t in ("liver", "kidney", "pancreas",
                                                                                   "spleen")]
    ours[ours == 11] = 0  # no spleen predicted
    assert agreement(ours, np.eye(4), reference, np.eye(4), "all")[-1].dice == 0.0


def test_absent_organ_and_tasks_without_organs():
    empty = np.zeros((8, 8, 8), np.uint8)
    [row] = agreement(box((8, 8, 8), slice(2, 4), slice(2, 4), slice(2, 4)), np.eye(4), empty, np.eye(4), "liver")
    assert row.dice is None and row.reference_volume_ml == 0
    for task in ("colon", "lung", "hepatic_vessel", "vertebrae", "brats", "autopet"):
        assert agreement(empty, np.eye(4), empty, np.eye(4), task) == []
    with pytest.raises(InputError):
        agreement(empty[0], np.eye(4), empty, np.eye(4), "liver")
    with pytest.raises(InputError, match="scheme"):
        agreement(empty, np.eye(4), empty, np.eye(4), "liver", scheme="total_v1")


def test_reference_on_another_grid_is_aligned_through_the_affines():
    # ours: 1 mm voxels; the reference: 2 mm voxels, its x axis stored reversed, covering the same space
    ours = box((20, 20, 20), slice(4, 12), slice(6, 14), slice(4, 12))
    coarse = box((10, 10, 10), slice(2, 6), slice(3, 7), slice(2, 6), value=TOTAL["liver"])
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = 0.5  # the centre of a 2 mm voxel sits between two 1 mm voxel centres
    flipped, flipped_affine = coarse[::-1], affine.copy()
    flipped_affine[0, 0], flipped_affine[0, 3] = -2.0, 0.5 + 2.0 * 9
    for reference, reference_affine in ((coarse, affine), (flipped, flipped_affine)):
        moved = align(reference, reference_affine, ours.shape, np.eye(4))
        assert moved.shape == ours.shape and np.array_equal(moved > 0, ours > 0)
        assert agreement(ours, np.eye(4), reference, reference_affine, "liver")[0].dice == 1.0
    shifted = np.eye(4)
    shifted[0, 3] = 2.0  # our grid 2 mm further along x: the organ appears 2 voxels earlier
    expected = numpy_dice(ours > 0, np.roll(ours > 0, -2, axis=0))
    assert agreement(ours, shifted, coarse, affine, "liver")[0].dice == pytest.approx(expected)


def test_real_reference_against_itself(tmp_path):
    """TotalSegmentator's map of the sample CT, written as a UniSeg all-tasks map, agrees with itself (Dice 1); its
    volumes are the voxel counts of the sample (reference/real-data.md) x 27 mm3."""
    path = sample("ct_small_seg")
    image = nib.load(path)
    reference = np.asanyarray(image.dataobj)
    ours = np.zeros(reference.shape, np.uint8)
    for organ, value in organ_values("all"):
        ours[np.isin(reference, [TOTAL[c] for c in organ.classes])] = value
    out = tmp_path / "example_ct_sm_all.nii.gz"
    nib.save(nib.Nifti1Image(ours, image.affine), out)
    rows = agreement_files(str(out), str(path), "all", case="example_ct_sm")
    counts = {"liver": 38634, "kidney": 3947 + 3676, "pancreas": 644, "spleen": 9452}
    assert {r.organ: r.dice for r in rows} == dict.fromkeys(counts, 1.0)
    assert {r.organ: r.reference_volume_ml for r in rows} == pytest.approx({k: v * 0.027 for k, v in counts.items()},
                                                                          abs=1e-3)


def test_totalsegmentator_class_ids_are_those_of_the_pinned_release():
    """The ids come from totalsegmentator/map_to_binary.py of the sdist the samples come from."""
    sample("ct_small")  # fetched (or the test skipped): the archive stays in the cache
    archive = sample_data.cache_dir() / sample_data.SDIST_FILE
    if not archive.is_file():
        pytest.skip(f"{archive} was removed from the cache after the samples were extracted")
    with tarfile.open(archive) as tar:
        source = tar.extractfile("totalsegmentator-2.18.0/totalsegmentator/map_to_binary.py").read().decode()
    [node] = [n for n in ast.parse(source).body if isinstance(n, ast.Assign)
              and any(getattr(t, "id", None) == "class_map" for t in n.targets)]
    class_map = ast.literal_eval(node.value)
    for scheme, classes in TOTALSEGMENTATOR_CLASSES.items():
        by_name = {name: value for value, name in class_map[scheme].items()}
        assert classes == {name: by_name[name] for name in classes}, scheme
    for organ in ORGANS:  # every organ is in the CT scheme whole (the MR scheme has no kidney cysts)
        assert set(organ.classes) <= set(TOTALSEGMENTATOR_CLASSES["total"])
