"""The MONAI bundle: inference and evaluation through ``monai.bundle run`` on real scans, and the Model Zoo checks.

Weights are the small official-format checkpoint of conftest, converted through the normal path. Real images are
the TotalSegmentator examples from PyPI (``uniseg_hub.app.sample_data``), cropped so the suite stays fast.
"""

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, verify_metadata, verify_net_in_out
from monai.bundle import run as bundle_run

from uniseg_hub.errors import UnisegHubError
from uniseg_hub.pipeline import MergeTasksd, TaskPredictor
from uniseg_hub.tasks import get_task, tasks_in_group
from uniseg_hub.training.evaluation import SegmentationReport

from scans import crop, sample

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundle"
INFERENCE = BUNDLE / "configs" / "inference.json"
EVALUATE = BUNDLE / "configs" / "evaluate.json"
META = BUNDLE / "configs" / "metadata.json"
SCHEMA = ROOT.parent / "shared" / "monai" / "meta_schema_20240725.json"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Real crops: CT (40x40x16 voxels at 3 mm of the upper abdomen, liver inside) and MR."""
    folder = tmp_path_factory.mktemp("data")
    return {
        "ct": crop(sample("ct_small"), folder / "ct.nii.gz", (slice(20, 60), slice(30, 70), slice(8, 24))),
        "ct_seg": crop(sample("ct_small_seg"), folder / "ct_seg.nii.gz",
                       (slice(20, 60), slice(30, 70), slice(8, 24))),
        "mr": crop(sample("mr_small"), folder / "mr.nii.gz", (slice(30, 60), slice(25, 55), slice(6, 14))),
    }


def run_bundle(weights, out, configs=(INFERENCE,), **overrides):
    bundle_run(config_file=[str(c) for c in configs], meta_file=str(META),
               logging_file=str(BUNDLE / "configs" / "logging.conf"), bundle_root=str(BUNDLE),
               weights=str(weights), output_dir=str(out), **overrides)


def parsed(weights, **overrides):
    parser = ConfigParser()
    parser.read_config(str(INFERENCE))
    parser.update({"bundle_root": str(BUNDLE), "weights": str(weights), **overrides})
    return parser


@pytest.mark.slow
def test_inference_end_to_end_on_real_ct_through_the_cli(converted_small, data, tmp_path):
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(INFERENCE), "--bundle_root",
           str(BUNDLE), "--input", str(data["ct"]), "--weights", str(converted_small), "--task", "liver",
           "--output_dir", str(tmp_path / "a")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "a" / "ct_liver.nii.gz"
    written, source = nib.load(out), nib.load(data["ct"])
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-4)
    np.testing.assert_allclose(written.header.get_zooms(), source.header.get_zooms(), atol=1e-5)
    labels = np.asanyarray(written.dataobj)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2}
    # a second run (in-process this time) gives the same label map
    run_bundle(converted_small, tmp_path / "b", input=str(data["ct"]), task="liver")
    np.testing.assert_array_equal(np.asanyarray(nib.load(tmp_path / "b" / "ct_liver.nii.gz").dataobj), labels)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [  # nothing temporary left
        "ct_liver.nii.gz", "ct_liver_colors.ctbl", "ct_liver_itksnap_labels.txt"]  # names and colours beside it
    assert "\n2 liver_tumour " in (tmp_path / "a" / "ct_liver_colors.ctbl").read_text()


@pytest.mark.slow
def test_existing_output_is_kept_unless_overwrite(converted_small, data, tmp_path):
    out = tmp_path / "ct_spleen.nii.gz"
    out.write_bytes(b"keep me")
    with pytest.raises(Exception) as err:
        run_bundle(converted_small, tmp_path, input=str(data["ct"]), task="spleen", tta=False)
    assert "already exists" in chain(err.value)
    assert out.read_bytes() == b"keep me"
    run_bundle(converted_small, tmp_path, input=str(data["ct"]), task="spleen", tta=False, overwrite=True)
    assert nib.load(out).shape == nib.load(data["ct"]).shape
    assert set(np.unique(np.asanyarray(nib.load(out).dataobj))) <= {0, 1}  # the task's own labels, not merged ones


def preprocess(weights, task, image):
    return parsed(weights, task=task, input=image).get_parsed_content("preprocessing")({"image": image})["image"]


@pytest.mark.slow
def test_preprocessing_of_each_input_kind(converted_small, data, tmp_path):
    ct = preprocess(converted_small, "liver", str(data["ct"]))
    assert ct.shape[0] == 1 and 0.0 <= float(ct.min()) and float(ct.max()) <= 1.0 and float(ct.max()) > 0.5
    np.testing.assert_allclose(ct.pixdim[:3], get_task("liver").spacing, atol=1e-4)

    mr = preprocess(converted_small, "prostate", str(data["mr"]))
    np.testing.assert_allclose(mr.pixdim[:3], (1.5, 1.5, 3.0), atol=1e-4)
    assert abs(float(mr.mean())) < 1e-3 and abs(float(mr.std()) - 1) < 1e-2

    # BraTS: four co-registered sequences (here made from the real MR), z-score over the brain (non-zero) voxels
    source = nib.load(data["mr"])
    array = np.asanyarray(source.dataobj).astype(np.float32)
    array[:5] = 0  # a zero background region, kept at zero
    files = []
    for i, scale in enumerate((1.0, 2.0, 0.5, 3.0)):
        files.append(str(tmp_path / f"brats_{i:04d}.nii.gz"))
        nib.save(nib.Nifti1Image(array * scale + 10 * i * (array != 0), source.affine), files[-1])
    brats = preprocess(converted_small, "brats", files)
    assert brats.shape[0] == 4
    np.testing.assert_allclose(brats.pixdim[:3], (1.0, 1.0, 1.0), atol=1e-4)
    for channel in brats:
        inside = channel[channel != 0]
        assert abs(float(inside.mean())) < 1e-3 and abs(float(inside.std()) - 1) < 1e-2

    # AutoPET: CT window on channel 0, z-score on the PET channel 1
    ct_image = nib.load(data["ct"])
    pet = np.clip(np.asanyarray(ct_image.dataobj).astype(np.float32) + 200, 0, None) / 100
    nib.save(nib.Nifti1Image(pet, ct_image.affine), tmp_path / "pet.nii.gz")
    both = preprocess(converted_small, "autopet", [str(data["ct"]), str(tmp_path / "pet.nii.gz")])
    np.testing.assert_allclose(both.pixdim[:3], (4.0, 4.0, 8.0), atol=1e-4)
    assert 0.0 <= float(both[0].min()) and float(both[0].max()) <= 1.0
    assert abs(float(both[1].mean())) < 1e-3 and abs(float(both[1].std()) - 1) < 1e-2


@pytest.fixture(scope="module")
def one_patch(converted_small, tmp_path_factory):
    """A real-CT-valued image exactly one network patch in size at the liver task's spacing."""
    rng = np.random.default_rng(0)
    hu = rng.uniform(-300, 300, size=(64, 64, 32)).astype(np.float32)
    path = tmp_path_factory.mktemp("patch") / "patch.nii.gz"
    nib.save(nib.Nifti1Image(hu, np.diag([1.5, 1.5, 3.0, 1.0])), path)
    parser = parsed(converted_small, input=str(path), task="liver")
    image = parser.get_parsed_content("preprocessing")({"image": str(path)})["image"]
    assert tuple(image.shape[1:]) == (64, 64, 32)
    return parser, image[None]


@pytest.mark.parametrize("tta", [False, True])
def test_sliding_window_on_one_patch_equals_a_direct_forward(one_patch, tta):
    parser, x = one_patch
    parser["tta"] = tta
    model = parser.get_parsed_content("network")
    predictor = parser.get_parsed_content("predictor", instantiate=True)
    with torch.no_grad():
        windowed = parser.get_parsed_content("inferer")(x.as_tensor(), predictor)
        flips = [a for n in range(4) for a in itertools.combinations((2, 3, 4), n)] if tta else [()]
        direct = sum(torch.flip(model(torch.flip(x.as_tensor(), a), "liver").softmax(1), a) for a in flips) / len(flips)
    assert windowed.shape == (1, 3, 64, 64, 32)
    torch.testing.assert_close(windowed, direct[:, :3], rtol=1e-5, atol=1e-5)


def test_all_tasks_mode_equals_the_tasks_one_by_one_merged(one_patch):
    parser, x = one_patch
    model = parser.get_parsed_content("network")
    ct_tasks = tasks_in_group("CT")
    with torch.no_grad():
        shared = TaskPredictor(model, ct_tasks, mirror=False)(x.as_tensor())
        one_by_one = torch.cat([TaskPredictor(model, [t], mirror=False, crop_classes=False)(x.as_tensor())
                                for t in ct_tasks], 1)
    torch.testing.assert_close(shared, one_by_one, rtol=1e-5, atol=1e-6)
    merge = MergeTasksd("pred", ct_tasks)
    expected = torch.zeros(x.shape[2:], dtype=torch.long)
    for k, task in enumerate(ct_tasks):  # official rule: argmax over the 4 channels, later tasks overwrite
        labels = one_by_one[0, 4 * k : 4 * k + 4].argmax(0)
        for i, value in enumerate(task.merged_labels, 1):
            expected[labels == i] = value
    # the shared decoder sums in another order (float32 tolerance): labels may differ only where a task's two
    # best classes tie within that tolerance (this random small model's probabilities are all near 0.25)
    differ = merge.merge(shared[0]) != expected
    gaps = torch.stack([one_by_one[0, 4 * k : 4 * k + 4].topk(2, 0).values.diff(dim=0)[0].abs()
                        for k in range(len(ct_tasks))])
    assert differ.float().mean() < 1e-3
    assert bool((gaps.min(0).values[differ] < 1e-5).all())


def test_merge_follows_the_official_rules():
    liver, spleen = get_task("liver"), get_task("spleen")
    probs = torch.zeros(8, 4)
    probs[0:4, 0] = torch.tensor([0.1, 0.8, 0.05, 0.05])  # liver says 1 (liver)
    probs[4:8, 0] = torch.tensor([0.1, 0.7, 0.1, 0.1])  # spleen says 1: overwrites with spleen
    probs[0:4, 1] = torch.tensor([0.1, 0.1, 0.7, 0.1])  # liver tumour
    probs[4:8, 1] = torch.tensor([0.9, 0.0, 0.0, 0.1])  # spleen background: keeps the tumour
    probs[0:4, 2] = torch.tensor([0.1, 0.1, 0.1, 0.7])  # channel 3 is no liver label: ignored
    probs[4:8, 2] = torch.tensor([0.1, 0.1, 0.7, 0.1])  # channel 2 is no spleen label: ignored
    merged = MergeTasksd("pred", [liver, spleen]).merge(probs[:, :, None, None])
    assert merged.flatten().tolist() == [11, 2, 0, 0]


@pytest.mark.slow
def test_all_mode_through_the_bundle(converted_small, data, tmp_path):
    run_bundle(converted_small, tmp_path, input=str(data["ct"]), task="all", tta=False)
    labels = np.asanyarray(nib.load(tmp_path / "ct_all.nii.gz").dataobj)
    assert labels.shape == nib.load(data["ct"]).shape
    assert set(np.unique(labels)) <= set(range(13))


def chain(error: BaseException) -> str:
    """All messages of an exception and its causes (MONAI wraps transform errors)."""
    messages = []
    while error is not None:
        messages.append(str(error))
        error = error.__cause__ or error.__context__
    return " | ".join(messages)


def our_error(error: BaseException) -> BaseException | None:
    """The first uniseg-hub error in the chain: the one a user (and the CLI) sees."""
    while error is not None and not isinstance(error, UnisegHubError):
        error = error.__cause__ or error.__context__
    return error


def bad_inputs(data, folder: Path):
    source = nib.load(data["ct"])
    array = np.asanyarray(source.dataobj).astype(np.float32)
    nan = array.copy()
    nan[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, source.affine), folder / "nan.nii.gz")
    infinite = array.copy()
    infinite[3, 3, 3] = np.inf
    nib.save(nib.Nifti1Image(infinite, source.affine), folder / "inf.nii.gz")
    nib.save(nib.Nifti1Image(array[:, :, 5], source.affine), folder / "flat.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros_like(array), source.affine), folder / "zeros.nii.gz")
    (folder / "garbage.nii.gz").write_bytes(b"this is not an image")
    shifted = source.affine.copy()
    shifted[0, 3] += 7.5
    nib.save(nib.Nifti1Image(array, shifted), folder / "pet_shifted.nii.gz")
    ct = str(data["ct"])
    return {
        "wrong channel count": (dict(input=[ct, ct], task="liver"), "takes 1 channel"),
        "2-D image": (dict(input=str(folder / "flat.nii.gz"), task="liver"), "3-D volumes"),
        "NaN voxels refused": (dict(input=str(folder / "nan.nii.gz"), task="liver", nan="refuse"), "1 NaN voxel"),
        "infinite voxels": (dict(input=str(folder / "inf.nii.gz"), task="liver"), "1 infinite voxel"),
        "empty image": (dict(input=str(folder / "zeros.nii.gz"), task="liver"), "is empty"),
        "unknown task": (dict(input=ct, task="livr"), "unknown task 'livr'"),
        "unreadable file": (dict(input=str(folder / "garbage.nii.gz"), task="liver"), "cannot read"),
        "missing file": (dict(input=str(folder / "missing.nii.gz"), task="liver"), "does not exist"),
        "geometry mismatch": (dict(input=[ct, str(folder / "pet_shifted.nii.gz")], task="autopet"),
                              "does not share the grid"),
    }


@pytest.mark.slow
def test_bad_inputs_get_one_clear_error_and_leave_no_output(converted_small, data, tmp_path):
    cases = bad_inputs(data, tmp_path)
    for name, (overrides, message) in cases.items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        with pytest.raises(Exception) as err:
            run_bundle(converted_small, out, tta=False, **overrides)
        cause = our_error(err.value)
        assert cause is not None, f"{name}: {chain(err.value)}"
        assert message in str(cause), f"{name}: {cause}"
        assert not out.exists() or not any(out.iterdir()), f"{name}: output left behind"


@pytest.mark.slow
def test_nan_voxels_are_segmented_as_zero_with_a_warning_by_default(converted_small, data, tmp_path):
    bad_inputs(data, tmp_path)
    with pytest.warns(UserWarning, match="1 NaN voxel\\(s\\) set to 0, as the official preprocessing does"):
        run_bundle(converted_small, tmp_path / "out", tta=False, input=str(tmp_path / "nan.nii.gz"), task="liver")
    assert (tmp_path / "out" / "nan_liver.nii.gz").is_file()


def test_dice_by_hand():
    report = SegmentationReport("unused", {0: "background", 1: "organ", 2: "tumour", 3: "cyst"})
    pred = torch.tensor([1, 1, 0, 0, 3, 0]).reshape(2, 3, 1)
    label = torch.tensor([1, 0, 0, 0, 0, 3]).reshape(2, 3, 1)
    rows = {r["name"]: r for r in report.score("case", pred, label, spacing=(1, 1, 1))}
    assert rows["organ"]["dice"] == pytest.approx(2 * 1 / (2 + 1))
    assert np.isnan(rows["tumour"]["dice"])  # absent from both: left out, the official downstream rule
    assert rows["cyst"]["dice"] == 0.0
    assert np.isnan(rows["tumour"]["hd95"])
    one = SegmentationReport("unused", {1: "organ", 2: "tumour"}, dice_empty="one")
    assert {r["name"]: r["dice"] for r in one.score("case", pred, label, (1, 1, 1))}["tumour"] == 1.0


@pytest.mark.slow
def test_evaluation_scores_a_perfect_prediction_as_one(converted_small, data, tmp_path):
    run_bundle(converted_small, tmp_path / "pred", input=str(data["ct"]), task="liver", tta=False)
    reference = tmp_path / "pred" / "ct_liver.nii.gz"
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps([{"image": str(data["ct"]), "label": str(reference)}]))
    run_bundle(converted_small, tmp_path / "eval", configs=(INFERENCE, EVALUATE), datalist_file=str(datalist),
               task="liver", tta=False)
    summary = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert summary["cases"] == 1 and summary["mean"]["dice"] == 1.0 and summary["mean"]["nsd"] == 1.0
    assert set(summary["labels"]) == {"liver", "liver tumour"}
    rows = (tmp_path / "eval" / "report.csv").read_text().splitlines()
    assert rows[0] == "case,task,label,name,dice,hd95,nsd" and len(rows) == 3
    assert rows[1].startswith("ct,liver,1,liver,1.000000,0.0000,1.000000")
    assert (tmp_path / "eval" / "report_boxplot.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_evaluation_against_a_real_reference(converted_small, data, tmp_path):
    # the real TotalSegmentator liver (label 5) as the reference: a valid score between 0 and 1
    seg = nib.load(data["ct_seg"])
    liver = (np.asanyarray(seg.dataobj) == 5).astype(np.uint8)
    nib.save(nib.Nifti1Image(liver, seg.affine), tmp_path / "liver.nii.gz")
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"testing": [{"image": str(data["ct"]), "label": "liver.nii.gz"}]}))
    run_bundle(converted_small, tmp_path / "eval", configs=(INFERENCE, EVALUATE), datalist_file=str(datalist),
               task="liver", tta=False)
    summary = json.loads((tmp_path / "eval" / "report.json").read_text())
    # the reported Dice is the one the saved label map and the reference give, computed here by hand
    predicted = np.asanyarray(nib.load(tmp_path / "eval" / "ct_liver.nii.gz").dataobj) == 1
    reference = liver == 1
    expected = 2 * (predicted & reference).sum() / (predicted.sum() + reference.sum())
    assert summary["labels"]["liver"]["dice"]["mean"] == pytest.approx(float(expected), abs=1e-6)
    hd95 = summary["labels"]["liver"]["hd95"]["mean"]
    assert (hd95 is None) == (not predicted.any()), "HD95 is undefined exactly when nothing is predicted"
    assert hd95 is None or hd95 > 0  # a random model's map is not the reference


def test_metadata_is_valid_against_the_zoo_schema(tmp_path):
    if not SCHEMA.is_file():
        pytest.skip(f"vendored schema {SCHEMA} not found")
    shutil.copy(SCHEMA, tmp_path / "schema.json")
    verify_metadata(meta_file=str(META), filepath=str(tmp_path / "schema.json"))
    meta = json.loads(META.read_text())
    assert set(meta["network_data_format"]["inputs"]) == {"image"}
    assert set(meta["network_data_format"]["outputs"]) == {"pred"}
    assert meta["version"] in meta["changelog"]
    assert "uniseg-hub" in meta["required_packages_version"]
    for name, facts in meta["tasks"].items():  # the metadata agrees with the task table
        task = get_task(name)
        assert facts["id"] == task.id and facts["channels"] == list(task.channels)
        assert {int(k): v for k, v in facts["labels"].items()} == task.label_names
        assert facts["spacing_mm_xyz"] == list(task.spacing)


@pytest.mark.slow
def test_network_def_passes_the_zoo_shape_check():
    # the full-size network: the metadata declares the official (192, 192, 64) patch and 4 head channels
    verify_net_in_out(net_id="network_def", meta_file=str(META), config_file=str(INFERENCE),
                      bundle_root=str(BUNDLE))


@pytest.mark.slow
def test_torchscript_is_excluded_and_onnx_export_works(converted_small, tmp_path):
    from uniseg_hub import load_model
    from uniseg_hub.app.export import export_onnx

    with pytest.raises(RuntimeError, match="cannot be used in a type expression|not supported"):
        torch.jit.script(load_model(converted_small))  # if this ever scripts, enable ckpt_export in the docs
    readme = (BUNDLE / "docs" / "README.md").read_text()
    assert "TorchScript" in readme and "exclude_verify_torchscript_list" in readme
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    out = export_onnx(converted_small, tmp_path / "uniseg.onnx", in_channels=1)  # checked against torch inside
    assert out.stat().st_size > 100_000
