"""The preprocessing and the way back, held to nnU-Net v1 itself (``nnunet==1.7.1`` from PyPI, which UniSeg forks):
its ``resample_patient`` and ``resample_data_or_seg`` are the reference, run on real scans whose headers are
changed to cover the grid cases (isotropic to anisotropic, 5 mm slices to 2.5 mm, near-identity, strong
downsampling, a volume smaller than the patch)."""

import contextlib
import io
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, CropForegroundd, Invertd

from uniseg_hub.errors import ConfigError, InputError
from uniseg_hub.pipeline import CheckImaged, InvertToInputd, NormalizeTaskd, ResampleToSpacingd, ZeroNaNd
from uniseg_hub.pipeline.resampling import lowres_axis, nearest_indices, resampled_shape

from scans import sample

with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints a citation banner on import
    from nnunet.preprocessing.preprocessing import resample_data_or_seg, resample_patient

# (input spacing, target spacing) in MONAI axis order (x, y, z)
GRIDS = {
    "isotropic to anisotropic target": ((1.0, 1.0, 1.0), (0.8, 0.8, 3.5)),
    "5 mm slices to 2.5 mm": ((0.7, 0.7, 5.0), (0.7, 0.7, 2.5)),
    "6 mm slices, the CT tasks' spacing": ((0.74, 0.74, 6.0), (0.77, 0.77, 1.0)),
    "near identity": ((1.5, 1.5, 3.0001), (1.5, 1.5, 3.0)),
    "strong downsampling": ((0.5, 0.5, 0.6), (4.0, 4.0, 5.0)),
    "anisotropic first axis": ((6.0, 0.7, 0.7), (2.5, 0.8, 0.8)),
    "tie at .5 along z": ((1.2, 1.2, 7.3), (0.93, 0.93, 2.13)),
}


def quiet(function, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints what it resamples
        return function(*args, **kwargs)


def scan(name: str, spacing, box=None) -> MetaTensor:
    """A real scan as the bundle loads it (C, x, y, z), its header given ``spacing``."""
    data = np.asanyarray(nib.load(sample(name)).dataobj).astype(np.float32)
    if box is not None:
        data = data[box]
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(data))[None], affine=torch.diag(
        torch.tensor([*spacing, 1.0], dtype=torch.float64)))


def official(image: MetaTensor, spacing, target) -> np.ndarray:
    data = image.numpy().copy()
    return quiet(resample_patient, data, None, np.array(spacing), np.array(target), 3, 0, force_separate_z=None,
                 order_z_data=0, order_z_seg=0)[0]


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("name", ["ct_small", "mr_small"])
def test_resampling_to_the_task_spacing_equals_nnunet(name, grid):
    spacing, target = GRIDS[grid]
    image = scan(name, spacing)
    ours = ResampleToSpacingd("image", target)({"image": image})["image"]
    reference = official(image, spacing, target)
    assert tuple(ours.shape) == reference.shape
    scale = float(image.max() - image.min())
    assert np.abs(ours.numpy() - reference).max() / scale < 1e-4
    # the grid's outer edges coincide with the input's: same world extent, effective spacing s * n / m
    extent_in = np.asarray(spacing) * np.asarray(image.shape[1:])
    extent_out = np.linalg.norm(ours.affine.numpy()[:3, :3], axis=0) * np.asarray(ours.shape[1:])
    assert np.allclose(extent_in, extent_out)
    corner_in = image.affine.numpy() @ np.array([-0.5, -0.5, -0.5, 1])
    corner_out = ours.affine.numpy() @ np.array([-0.5, -0.5, -0.5, 1])
    assert np.allclose(corner_in, corner_out)


def test_a_volume_smaller_than_the_patch_and_the_anisotropy_rule():
    image = scan("ct_small", (2.0, 2.0, 2.0), (slice(30, 70), slice(20, 60), slice(5, 25)))
    target = (0.77, 0.77, 1.0)
    ours = ResampleToSpacingd("image", target)({"image": image})["image"]
    assert np.abs(ours.numpy() - official(image, (2.0, 2.0, 2.0), target)).max() / float(image.max() - image.min()) \
        < 1e-4
    assert resampled_shape((512, 512, 300), (0.7, 0.7, 1.0), (0.77, 0.77, 1.0)) == (465, 465, 300)
    assert lowres_axis((0.7, 0.7, 5.0), (1, 1, 1)) == 2 and lowres_axis((1, 1, 1), (4, 0.5, 0.5)) == 0
    assert lowres_axis((0.24, 1.25, 1.25), (1, 1, 1)) is None and lowres_axis((1, 1, 2.9), (1, 1, 1)) is None


def test_nearest_indices_round_ties_as_scipy_does():
    from scipy.ndimage import map_coordinates

    for n, m in [(30, 103), (60, 30), (30, 60), (7, 19), (19, 7)]:
        coordinates = float(n) / m * (np.arange(m) + 0.5) - 0.5
        expected = map_coordinates(np.arange(n, dtype=float), [coordinates], order=0, mode="nearest")
        assert nearest_indices(n, m).tolist() == expected.astype(int).tolist()


def padded(image: MetaTensor, margin=((5, 3), (2, 6), (4, 1))) -> MetaTensor:
    """``image`` inside a zero margin, which the foreground crop removes again."""
    data = torch.nn.functional.pad(image.as_tensor(), [p for pair in reversed(margin) for p in pair])
    return MetaTensor(data, affine=image.affine)


@pytest.mark.parametrize("grid", ["5 mm slices to 2.5 mm", "6 mm slices, the CT tasks' spacing", "near identity",
                                  "strong downsampling", "anisotropic first axis"])
def test_probabilities_go_back_to_the_input_grid_as_nnunet_exports_them(grid):
    """The official export: softmax resampled with order 1 onto the cropped grid (nearest along the low-resolution
    axis), argmax, put into the uncropped volume. Both our ways back (the fast matrices, and MONAI's Invertd through
    ``ResampleToSpacingd.inverse``) give the same label map."""
    spacing, target = GRIDS[grid]
    image = padded(scan("ct_small", spacing))
    pre = Compose([CropForegroundd("image", source_key="image", select_fn=lambda x: x != 0, allow_smaller=True),
                   ResampleToSpacingd("image", target)])
    prepared = pre({"image": image})["image"]
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn((3, *[max(2, s // 6) for s in prepared.shape[1:]]), generator=generator)
    smooth = torch.nn.functional.interpolate(logits[None], size=tuple(prepared.shape[1:]), mode="trilinear")[0]
    probabilities = torch.softmax(4 * smooth, 0)
    pred = MetaTensor(probabilities.clone(), affine=prepared.affine, applied_operations=prepared.applied_operations)

    fast = InvertToInputd("pred", pre, "image")({"pred": pred, "image": prepared})["pred"]
    monai = Invertd("pred", pre, "image", nearest_interp=False, to_tensor=True)({"pred": pred.clone(),
                                                                                  "image": prepared})["pred"]

    crop = prepared.applied_operations[0]["extra_info"]["cropped"]
    cropped_shape = [image.shape[1 + a] - crop[2 * a] - crop[2 * a + 1] for a in range(3)]
    axis = lowres_axis(spacing, target)
    back = quiet(resample_data_or_seg, probabilities.numpy(), cropped_shape, False, None if axis is None else [axis],
                 1, axis is not None, 0)
    expected = np.zeros(image.shape[1:], dtype=np.int64)
    expected[crop[0]:image.shape[1] - crop[1], crop[2]:image.shape[2] - crop[3],
             crop[4]:image.shape[3] - crop[5]] = back.argmax(0)
    for ours in (fast, monai):
        assert tuple(ours.shape[1:]) == expected.shape
        agree = (ours.argmax(0).numpy() == expected).mean()
        assert agree >= 0.999, agree
        assert np.allclose(ours.affine.numpy(), image.affine.numpy())
    inside = (slice(None), *[slice(crop[2 * a], image.shape[1 + a] - crop[2 * a + 1]) for a in range(3)])
    assert np.abs(fast[inside].numpy() - back).max() < 1e-5


def test_nan_voxels_count_as_zero_with_a_warning_or_are_refused():
    image = scan("ct_small", (3.0, 3.0, 3.0))
    image[0, 10:12, 10:12, 5] = float("nan")
    data = {"image": image}
    CheckImaged("image", channels=1)(data)  # NaN passes the check by default: the official code zeroes them
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        zeroed = ZeroNaNd("image")(data)["image"]
    assert [str(w.message).count("4 NaN voxel(s) set to 0") for w in caught] == [1]
    assert not torch.isnan(zeroed).any() and float(zeroed[0, 10, 10, 5]) == 0 and isinstance(zeroed, MetaTensor)
    with pytest.raises(InputError, match="4 NaN voxel.*nan=zero"):
        CheckImaged("image", channels=1, nan="refuse")(data)
    image[0, 0, 0, 0] = float("inf")
    with pytest.raises(InputError, match="1 infinite voxel"):
        CheckImaged("image", channels=1)(data)
    with pytest.raises(ConfigError, match="nan must be one of zero, refuse"):
        CheckImaged("image", channels=1, nan="keep")


def test_brats_z_scoring_uses_the_training_mask_by_default_and_the_predict_py_one_on_request():
    generator = torch.Generator().manual_seed(1)
    data = torch.zeros(4, 12, 12, 8)
    data[:, 3:9, 3:9, 2:6] = torch.rand(4, 6, 6, 4, generator=generator) * 100 + 50
    image = MetaTensor(data.clone())
    trained = NormalizeTaskd("image", "brats")({"image": image})["image"].as_tensor()
    whole = NormalizeTaskd("image", "brats", mask="none")({"image": image})["image"].as_tensor()
    inside = data[0] != 0
    assert torch.equal(image.as_tensor(), data) and int(inside.sum()) == 6 * 6 * 4  # the input is left as it was
    assert float(trained[0][~inside].abs().max()) == 0  # outside the brain stays 0
    assert abs(float(trained[0][inside].mean())) < 1e-5 and abs(float(whole[0].mean())) < 1e-5
    assert float(whole[0][~inside].max()) < 0  # zeros are z-scored with the rest
    with pytest.raises(ConfigError, match="normalization_mask must be one of training, none"):
        NormalizeTaskd("image", "brats", mask="brain")


@pytest.mark.parametrize("spacing", [(0.8, 0.8, 5.0), (1.0, 1.0, 1.0)])
def test_preprocess_is_the_official_chain_and_postprocess_goes_back(spacing, tmp_path):
    """``uniseg_hub.preprocess`` (the bundle's own transforms) against nnU-Net v1's crop to the non-zero box, its
    resampling and UniSeg's CT window ((clip(x, -325, 325) + 325) / 650, DoDNetPreprocessor); from a file and
    from a MetaTensor alike. ``postprocess`` brings a prediction back onto the file's grid."""
    from nnunet.preprocessing.cropping import crop_to_nonzero

    from uniseg_hub import postprocess, preprocess
    from uniseg_hub.tasks import get_task

    image = padded(scan("ct_small", spacing))
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(image[0].numpy(), image.affine.numpy()), path)
    ours = preprocess(path, "liver")
    cropped, _, _ = crop_to_nonzero(image.numpy().copy(), None)
    resampled = official(MetaTensor(torch.from_numpy(cropped)), spacing, get_task("liver").spacing)
    expected = (np.clip(resampled, -325, 325) + 325) / 650
    assert tuple(ours.shape) == expected.shape and np.abs(ours.numpy() - expected).max() < 1e-4
    from_tensor = preprocess(MetaTensor(image.clone(), affine=image.affine), "liver")
    assert torch.equal(from_tensor.as_tensor(), ours.as_tensor())

    back = postprocess(torch.stack([ours[0], 1 - ours[0]]), ours)
    assert tuple(back.shape) == (2, *image.shape[1:])
    assert np.allclose(back.affine.numpy(), image.affine.numpy())
    margin = back.as_tensor()[0]
    assert float(margin[:5].abs().max()) == 0 == float(margin[:, :, -1].abs().max())  # cropped away: stays 0
    with pytest.raises(InputError, match="no affine"):
        preprocess(image.as_tensor(), "liver")
    with pytest.raises(InputError, match="grid"):
        postprocess(torch.zeros(2, 3, 3, 3), ours)
