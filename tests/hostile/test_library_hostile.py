"""Hostile inputs at the library's doors (issue 15): damaged checkpoints, config.json files, manifests, images and
datasets are refused with a typed ``UnisegHubError`` naming the problem, never a traceback, a huge allocation or a
silently wrong result."""

import gzip
import json
import shutil
from collections import OrderedDict
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import SMALL
from monai.data import MetaTensor

import uniseg_hub.pretrained
from uniseg_hub import load_encoder, load_model, preprocess
from uniseg_hub.app.prepare import prepare
from uniseg_hub.config import UniSegConfig
from uniseg_hub.errors import (
    ConfigError,
    DatasetLayoutError,
    IncompatibleCheckpointError,
    InputError,
    ManifestError,
)
from uniseg_hub.hub.manifest import load_manifest, packaged_manifest, parse_manifest
from uniseg_hub.pipeline import ResampleToSpacingd, resampling
from uniseg_hub.weights import (
    convert_checkpoint,
    read_folder,
    read_official_checkpoint,
    read_safetensors,
    save_folder,
)

from official_format import official_shapes, save_official_checkpoint, seeded_state_dict

# ----------------------------------------------------------------------------------------------- checkpoints


def _folder_with(converted, tmp_path, change) -> Path:
    """A copy of the converted small folder whose state dict went through ``change(state)``."""
    checkpoint = read_folder(converted)
    state = dict(checkpoint.state)
    change(state)
    return save_folder(tmp_path / "changed", state, checkpoint.config)


def _nan(state):
    state["encoder.stages.2.0.conv.weight"] = state["encoder.stages.2.0.conv.weight"].clone()
    state["encoder.stages.2.0.conv.weight"][0, 0, 0, 0, 0] = float("nan")


def _inf(state):
    state["decoder.heads.0.weight"] = torch.full_like(state["decoder.heads.0.weight"], float("-inf"))


@pytest.mark.parametrize("change, words", [
    (_nan, ["encoder.stages.2.0.conv.weight", "NaN or infinite"]),
    (_inf, ["decoder.heads.0.weight", "NaN or infinite"]),
    (lambda s: s.update({"prompt.universal": s["prompt.universal"].half()}), ["prompt.universal (float16)", "float32"]),
    (lambda s: s.update({"decoder.heads.0.weight": s["decoder.heads.0.weight"].long()}),
     ["decoder.heads.0.weight (int64)", "float32"]),
    (lambda s: s.update({"decoder.heads.0.weight": s["decoder.heads.0.weight"] > 0}),
     ["decoder.heads.0.weight (bool)", "float32"]),
    (lambda s: s.update({"prompt.universal": torch.zeros(1, 11, 0, 2, 2)}), ["prompt.universal (1, 11, 0, 2, 2)",
                                                                            "wrong shape"]),
    (lambda s: s.pop("decoder.heads.0.weight"), ["missing 1 tensors: decoder.heads.0.weight"]),
    (lambda s: s.update({"extra": torch.zeros(2)}), ["unexpected 1 tensors: extra"]),
])
@pytest.mark.parametrize("load", [
    lambda p: load_model(p),
    lambda p: load_model(p, num_classes=3),  # the prompt and heads are not moved, yet still checked
    lambda p: load_encoder(p, in_channels=1),
])
def test_damaged_folder_is_refused_naming_the_tensor(converted_small, tmp_path, change, words, load):
    folder = _folder_with(converted_small, tmp_path, change)
    with pytest.raises(IncompatibleCheckpointError) as info:
        load(folder)
    message = str(info.value)
    assert all(w in message for w in words), message
    assert "uniseg-hub convert" in message and str(folder) in message


def test_the_intact_copy_still_loads(converted_small, tmp_path):
    folder = _folder_with(converted_small, tmp_path, lambda s: None)
    assert load_model(folder).load_report.summary().startswith("loaded 115 tensors")


def _official(tmp_path, change):
    state = seeded_state_dict(official_shapes(**SMALL), seed=3)
    change(state)
    path = tmp_path / "model_final_checkpoint.model"
    save_official_checkpoint(path, state)
    return path


@pytest.mark.parametrize("change, words", [
    (lambda s: s["tu.0.weight"].view(-1).__setitem__(3, float("nan")), ["tu.0.weight", "NaN or infinite"]),
    (lambda s: s["tu.0.weight"].view(-1).__setitem__(0, float("inf")), ["tu.0.weight", "NaN or infinite"]),
    (lambda s: s.update({"tu.1.weight": s["tu.1.weight"].half()}), ["tu.1.weight (float16)", "float32"]),
    (lambda s: s.update({"tu.1.weight": s["tu.1.weight"].long()}), ["tu.1.weight (int64)", "float32"]),
    (lambda s: s.update({"tu.1.weight": s["tu.1.weight"] > 0}), ["tu.1.weight (bool)", "float32"]),
    (lambda s: s.update({7: torch.zeros(3)}), ["not strings", "7"]),
    (lambda s: s.update({"intermedia_prompt": torch.zeros(1, 11, 0, 4, 4)}), ["intermedia_prompt"]),
    (lambda s: s.update({"seg_outputs.0.weight": torch.zeros(4, 4, 0, 1, 1)}), ["seg_outputs.0.weight"]),
])
def test_damaged_official_checkpoint_is_refused(tmp_path, change, words):
    path = _official(tmp_path, change)
    with pytest.raises(IncompatibleCheckpointError) as info:
        convert_checkpoint(path, tmp_path / "out")
    assert all(w in str(info.value) for w in words), str(info.value)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_official_state_dict_with_integer_keys_only(tmp_path):
    path = tmp_path / "ints.model"
    torch.save({"state_dict": OrderedDict([(1, torch.zeros(2)), (2, torch.ones(2))])}, path)
    with pytest.raises(IncompatibleCheckpointError, match="not strings"):
        read_official_checkpoint(path)


# ----------------------------------------------------------------------------------------------- config.json


def _with_config(converted, tmp_path, text) -> Path:
    folder = tmp_path / "folder"
    shutil.copytree(converted, folder)
    (folder / "config.json").write_text(text)
    return folder


def _edit(converted, **changes) -> str:
    document = json.loads((converted / "config.json").read_text())
    document["config"].update(changes)
    return json.dumps(document)


@pytest.mark.parametrize("text, words", [
    ("{", ["not valid JSON", "config.json"]),
    ("[" * 100_000 + "]" * 100_000, ["nested too deeply", "config.json"]),
    ("\xff\xfe garbage", ["not valid JSON"]),
    ("[]", ["'architecture' name and a 'config' object"]),
    ('{"architecture": [1], "config": {}}', ["architecture must be one of"]),
    ('{"architecture": "UniSeg", "config": {"features": "wide"}}', ["features must be a list"]),
    ('{"architecture": "UniSeg", "config": {"nonsense": 1}}', ["unknown UniSeg field(s) nonsense"]),
])
def test_damaged_config_json_is_a_config_error(converted_small, tmp_path, text, words):
    folder = _with_config(converted_small, tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_model(folder)
    assert all(w in str(info.value) for w in words), str(info.value)


@pytest.mark.parametrize("changes, field", [
    (dict(features=[4, 8, 16, 16, 16, 1 << 40]), "features[5]"),
    (dict(features=[4, 8, 16, 16, 16, 16.0]), "features[5]"),
    (dict(in_channels=[1, 2, True]), "in_channels[2]"),
    (dict(kernel_sizes=[[3, 3, 1]] * 5 + [[3, 3, 99]]), "kernel_sizes[5][2]"),
    (dict(strides=[[1, 1, 1]] + [[2, 2, 1]] + [[2, 2, -2]] * 4), "strides[2][2]"),
    (dict(num_tasks=10 ** 12), "num_tasks"),
    (dict(patch_size=[64, 64]), "patch_size"),
    (dict(patch_size=[65, 64, 32]), "patch_size"),
    # each size in bounds, yet a universal prompt of 1024 x 512^3 floats (half a terabyte)
    (dict(num_tasks=1024, strides=[[1, 1, 1]] * 6, patch_size=[512, 512, 512]), "parameters"),
])
def test_config_json_out_of_bounds_names_the_field(converted_small, tmp_path, changes, field):
    folder = _with_config(converted_small, tmp_path, _edit(converted_small, **changes))
    with pytest.raises(ConfigError) as info:
        load_model(folder)
    assert field in str(info.value) and "config.json" in str(info.value), str(info.value)


def test_config_json_that_disagrees_with_the_weights_builds_nothing(converted_small, tmp_path, monkeypatch):
    """A valid but different architecture (a larger prompt) is compared with the weights before any network is
    built or any tensor is allocated."""
    folder = _with_config(converted_small, tmp_path, _edit(converted_small, num_tasks=1000))

    def no_build(*args, **kwargs):
        raise AssertionError("a network was built")

    monkeypatch.setattr(uniseg_hub.pretrained, "build_network", no_build)
    wrong = r"config.json\): .*wrong shape.*prompt.fusion.2.adn.N.bias \(11,\) != \(1000,\)"
    with pytest.raises(IncompatibleCheckpointError, match=wrong):
        load_model(folder)


def test_unreadable_config_json(converted_small, tmp_path):
    folder = _with_config(converted_small, tmp_path, "{}")
    (folder / "config.json").chmod(0)
    try:
        if (folder / "config.json").stat().st_mode and _can_read(folder / "config.json"):
            pytest.skip("running as root: permissions do not stop reading")
        with pytest.raises(ConfigError, match="cannot read .*config.json"):
            load_model(folder)
    finally:
        (folder / "config.json").chmod(0o644)


def _can_read(path) -> bool:
    try:
        path.read_bytes()
        return True
    except OSError:
        return False


def test_truncated_safetensors(converted_small, tmp_path):
    folder = _with_config(converted_small, tmp_path, (converted_small / "config.json").read_text())
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(IncompatibleCheckpointError, match="not a readable safetensors file"):
        read_safetensors(folder / "model.safetensors")


def test_universal_prompt_counts_towards_the_parameter_bound():
    config = UniSegConfig(features=(4, 8), kernel_sizes=((3, 3, 1), (3, 3, 3)), strides=((1, 1, 1), (2, 2, 2)),
                          num_tasks=2, patch_size=(64, 64, 32))
    assert config.parameter_estimate() > 2 * 32 * 32 * 16  # the prompt alone
    with pytest.raises(ConfigError, match="parameters"):
        UniSegConfig(features=(4, 8), kernel_sizes=((3, 3, 1), (3, 3, 3)), strides=((1, 1, 1), (1, 1, 1)),
                     num_tasks=1024, patch_size=(512, 512, 512))


# ----------------------------------------------------------------------------------------------- manifests


def _manifest_entry() -> dict:
    return next(iter(packaged_manifest().models.values())).to_dict()


@pytest.mark.parametrize("filename", [
    "..\\..\\evil.safetensors", "a\\..\\b.safetensors", "C:/x.safetensors", "c:evil.safetensors",
    "a//b.safetensors", "./model.safetensors", "a/./b.safetensors", "../model.safetensors", "/model.safetensors",
    "a/\x00.safetensors", "model.bin", "",
])
def test_manifest_filename_cannot_leave_the_repository(filename):
    entry = {**_manifest_entry(), "filename": filename}
    with pytest.raises(ManifestError, match="filename"):
        parse_manifest({"schema_version": 1, "models": [entry]})


def test_manifest_nested_deeply_is_a_manifest_error(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text('{"schema_version": 1, "models": [' + "[" * 200_000 + "]" * 200_000 + "]}")
    with pytest.raises(ManifestError, match="nested too deeply"):
        load_manifest(path)
    deep = []
    for _ in range(100_000):
        deep = [deep]
    entry = {**_manifest_entry(), "name": deep}
    with pytest.raises(ManifestError, match="name"):
        load_manifest({"schema_version": 1, "models": [entry]})
    entry = {**_manifest_entry(), "notes": deep}
    with pytest.raises(ManifestError, match="notes"):
        load_manifest({"schema_version": 1, "models": [entry]})


# ----------------------------------------------------------------------------------------------- image headers


def _scan_with_affine(path, srows, pixdim):
    """A small .nii.gz whose sform (and pixdim) are written as given, even where nibabel would refuse them."""
    data = np.random.default_rng(0).normal(100, 20, size=(12, 12, 6)).astype(np.float32)
    raw = bytearray(nib.Nifti1Image(data, np.eye(4)).to_bytes())
    raw[252:256] = np.asarray([0, 1], np.int16).tobytes()  # qform_code 0, sform_code 1
    raw[76:108] = np.asarray([1, *pixdim, 1, 1, 1, 1], np.float32).tobytes()
    raw[280:328] = np.asarray(srows, np.float32).tobytes()
    with gzip.open(path, "wb") as f:
        f.write(bytes(raw))
    return path


NAN = float("nan")


@pytest.mark.parametrize("srows, pixdim, words", [
    ([[NAN, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], [NAN, 1, 1], "NaN or infinite"),
    ([[float("inf"), 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], [float("inf"), 1, 1], "NaN or infinite"),
    ([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]], [1, 1, 1], "singular"),
    ([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0]], [2 ** 0.5, 2 ** 0.5, 1], "singular"),
    ([[1e-6, 0, 0, 0], [0, 1e-6, 0, 0], [0, 0, 1e-6, 0]], [1e-6, 1e-6, 1e-6], "voxel size of (1e-06, 1e-06, 1e-06)"),
    ([[1e6, 0, 0, 0], [0, 1e6, 0, 0], [0, 0, 1, 0]], [1e6, 1e6, 1], "voxel size of (1e+06, 1e+06, 1)"),
])
def test_damaged_affine_is_refused_when_read(tmp_path, srows, pixdim, words):
    path = _scan_with_affine(tmp_path / "scan.nii.gz", srows, pixdim)
    with pytest.raises(InputError) as info:
        preprocess(path, "liver")
    assert words in str(info.value) and "scan.nii.gz" in str(info.value), str(info.value)


def test_resampled_size_is_bounded_before_allocating(monkeypatch):
    """Voxels of 90 mm (in bounds) resampled to the liver's 1.5 mm: refused with the size it would take, by the
    check and by the resampling itself, before anything is allocated."""
    image = MetaTensor(torch.rand(1, 40, 40, 40) + 1, affine=torch.as_tensor(np.diag([90.0, 90.0, 90.0, 1.0])))
    monkeypatch.setattr(resampling, "resample_like_nnunet", lambda *a, **k: pytest.fail("resampling ran"))
    with pytest.raises(InputError, match=r"2400 x 2400 x 1200 voxels \(25.7 GiB in float32\)"):
        preprocess(image, "liver")
    with pytest.raises(InputError, match="2400 x 2400 x 1200 voxels"):
        ResampleToSpacingd("image", pixdim=(1.5, 1.5, 3.0))({"image": image})
    small = MetaTensor(torch.rand(1, 40, 40, 40) + 1, affine=torch.as_tensor(np.diag([3.0, 3.0, 6.0, 1.0])))
    monkeypatch.undo()
    assert tuple(preprocess(small, "liver").shape) == (1, 80, 80, 80)


# ----------------------------------------------------------------------------------------------- prepare


def _btcv(tmp_path, damage=None):
    """A fake BTCV tree (Synapse RawData layout) of 4 small cases; ``damage(image_path, label_path)`` on case 1."""

    raw = tmp_path / "raw"
    for n in (1, 2, 32, 33):
        image = raw / "RawData" / "Training" / "img" / f"img{n:04d}.nii.gz"
        label = raw / "RawData" / "Training" / "label" / f"label{n:04d}.nii.gz"
        image.parent.mkdir(parents=True, exist_ok=True)
        label.parent.mkdir(parents=True, exist_ok=True)
        seg = np.zeros((6, 6, 4), np.uint8)
        seg[2:4, 2:4, 1:3] = 6
        nib.save(nib.Nifti1Image(np.where(seg > 0, 100, -1000).astype(np.int16), np.diag([0.8, 0.8, 3, 1])), image)
        nib.save(nib.Nifti1Image(seg, np.diag([0.8, 0.8, 3, 1])), label)
        if n == 1 and damage is not None:
            damage(image, label)
    return raw


def _relabel(values, dtype="uint8", shape=(6, 6, 4), affine=(0.8, 0.8, 3)):
    def damage(image, label):
        seg = np.zeros(shape, dtype)
        seg.flat[: len(values)] = values
        nib.save(nib.Nifti1Image(seg, np.diag([*affine, 1])), label)
    return damage


def _cut(image, label):
    data = label.read_bytes()
    label.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage, words", [
    (_cut, ["case bcv_1", "label0001.nii.gz", "extract or download the dataset again"]),
    (lambda image, label: label.write_bytes(b"not a nifti"), ["case bcv_1", "cannot read its label map"]),
    (_relabel([14]), ["case bcv_1", "values from 0 to 14", "0 to 13"]),
    (_relabel([-1], "int16"), ["case bcv_1", "values from -1 to 0"]),
    (_relabel([2.5], "float32"), ["case bcv_1", "not all whole numbers"]),
    (_relabel([float("nan")], "float32"), ["case bcv_1", "not all whole numbers"]),
    (_relabel([1], shape=(6, 6, 5)), ["case bcv_1", "not on the voxel grid", "(6, 6, 5) != (6, 6, 4)"]),
    (_relabel([1], affine=(0.8, 0.8, 2.5)), ["case bcv_1", "their affines differ"]),
    (_relabel([1], shape=(6, 6)), ["case bcv_1", "not a 3-D volume"]),
])
def test_damaged_dataset_names_the_case_and_the_fix(tmp_path, damage, words):
    raw = _btcv(tmp_path, damage)
    with pytest.raises(DatasetLayoutError) as info:
        prepare("btcv", str(raw), str(tmp_path / "out"))
    assert all(w in str(info.value) for w in words), str(info.value)
    assert not (tmp_path / "out" / "datalist.json").exists()


def test_intact_fake_dataset_prepares(tmp_path):
    result = prepare("btcv", str(_btcv(tmp_path)), str(tmp_path / "out"))
    assert (result["training"], result["validation"]) == (2, 2)


@pytest.mark.parametrize("dataset", ["btcv", "vs"])
def test_empty_dataset_folders(tmp_path, dataset):
    raw = tmp_path / "raw"
    raw.mkdir()
    with pytest.raises(DatasetLayoutError, match="found nothing"):
        prepare(dataset, str(raw), str(tmp_path / "out"))
    for sub in ("imagesTr", "labelsTr", "RawData/Training/img", "RawData/Training/label", "VS-SEG"):
        (raw / sub).mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="does not look like"):
        prepare(dataset, str(raw), str(tmp_path / "out"))


# ----------------------------------------------------------------------------------------------- training checkpoints


def _trainer(tmp_path, resume=False):
    """A tiny backbone, its optimizer, a ``TrainingCheckpoint`` in tmp_path/ckpt and an engine at epoch 0 of 3."""
    from ignite.engine import Engine

    from uniseg_hub.networks import UniSegBackbone
    from uniseg_hub.training.handlers import TrainingCheckpoint

    config = UniSegConfig("UniSegBackbone", in_channels=(1,), features=(2, 4), kernel_sizes=((3, 3, 1), (3, 3, 3)),
                          strides=((1, 1, 1), (2, 2, 2)), num_classes=2)
    network = UniSegBackbone(config=config)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9)
    checkpoint = TrainingCheckpoint(tmp_path / "ckpt", network, optimizer, resume=resume)
    engine = Engine(lambda e, b: None)
    engine.state.epoch_length, engine.state.max_epochs = 4, 3
    return network, optimizer, checkpoint, engine


def _step(network, optimizer, engine, epoch):
    for p in network.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    engine.state.epoch, engine.state.iteration = epoch, 4 * epoch


def _weights(folder):
    return {k: v.clone() for k, v in read_folder(folder).state.items()}


def _failing_save(monkeypatch, error):
    """safetensors' writer writes half a file, then fails with ``error``."""
    import uniseg_hub.weights as weights

    real = weights.save_file

    def half_then_fail(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(f.seek(0, 2) // 2)
        raise error

    monkeypatch.setattr(weights, "save_file", half_then_fail)


def test_full_disk_during_a_checkpoint_save_keeps_the_last_good_one(tmp_path, monkeypatch):
    import errno
    import os

    from uniseg_hub.errors import TrainingError

    network, optimizer, checkpoint, engine = _trainer(tmp_path)
    _step(network, optimizer, engine, 1)
    checkpoint.save_last(engine)
    good = _weights(checkpoint.last_dir)
    _step(network, optimizer, engine, 2)
    _failing_save(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with pytest.raises(TrainingError, match=r"No space left on device.*previous checkpoint in .*last is intact.*"
                                            r"--resume true"):
        checkpoint.save_last(engine)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last"]  # no partial folder left
    for k, v in _weights(checkpoint.last_dir).items():
        assert torch.equal(v, good[k]), k
    # the run continues from the last good checkpoint (epoch 1)
    network2, optimizer2, resumed, engine2 = _trainer(tmp_path, resume=True)
    resumed.started(engine2)
    assert (engine2.state.epoch, engine2.state.iteration) == (1, 4)
    for k, v in network2.state_dict().items():
        assert torch.equal(v, good[k]), k
    assert optimizer2.state_dict()["state"][0]["momentum_buffer"].abs().sum() > 0


def test_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    network, optimizer, checkpoint, engine = _trainer(tmp_path)
    _step(network, optimizer, engine, 1)
    checkpoint.save_last(engine)
    good = _weights(checkpoint.last_dir)
    _step(network, optimizer, engine, 2)
    _failing_save(monkeypatch, KeyboardInterrupt())  # the process dies mid-write (nothing is cleaned up but the tmp)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_last(engine)
    monkeypatch.undo()
    _, _, resumed, engine2 = _trainer(tmp_path, resume=True)
    resumed.started(engine2)
    assert engine2.state.epoch == 1
    assert all(torch.equal(v, good[k]) for k, v in _weights(checkpoint.last_dir).items())


def test_kill_between_the_renames_of_a_swap(tmp_path, monkeypatch):
    """Killed after last/ was moved aside and before the new folder took its place: resume uses the moved copy, and
    the next save does not delete it before the new one is in place."""
    import os

    import uniseg_hub.training.handlers as handlers

    network, optimizer, checkpoint, engine = _trainer(tmp_path)
    _step(network, optimizer, engine, 1)
    checkpoint.save_last(engine)
    _step(network, optimizer, engine, 2)
    real = os.replace

    def replace_then_die(src, dst):
        if Path(dst) == checkpoint.last_dir:  # the new folder's rename into place
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(handlers.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_last(engine)
    monkeypatch.undo()
    assert not checkpoint.last_dir.exists() and (tmp_path / "ckpt" / ".last.previous").is_dir()
    for killed_again in (True, False):  # the resumed run is killed at the same point once more, then saves
        network2, optimizer2, resumed, engine2 = _trainer(tmp_path, resume=True)
        resumed.started(engine2)
        assert engine2.state.epoch == 1
        _step(network2, optimizer2, engine2, 2)
        if killed_again:
            monkeypatch.setattr(handlers.os, "replace", replace_then_die)
            with pytest.raises(KeyboardInterrupt):
                resumed.save_last(engine2)
            monkeypatch.undo()
    resumed.save_last(engine2)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last"]
    assert torch.load(checkpoint.last_dir / "training_state.pt", weights_only=True)["trainer"]["epoch"] == 2


def test_damaged_training_state_is_a_resume_error(tmp_path):
    from uniseg_hub.errors import ResumeError

    network, optimizer, checkpoint, engine = _trainer(tmp_path)
    _step(network, optimizer, engine, 1)
    checkpoint.save_last(engine)
    state = checkpoint.last_dir / "training_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    _, _, resumed, engine2 = _trainer(tmp_path, resume=True)
    with pytest.raises(ResumeError, match="training_state.pt .*damaged"):
        resumed.started(engine2)


def test_cut_uncompressed_nifti_is_an_input_error(tmp_path):
    data = np.random.default_rng(2).normal(size=(10, 10, 10)).astype(np.float32)
    path = tmp_path / "cut.nii"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(InputError, match="cannot read the voxels of .*cut.nii .*damaged or incomplete"):
        preprocess(path, "liver")
