"""Hostile inputs at the library's doors (issue 15): damaged checkpoints, config.json files, manifests, images and
datasets are refused with a typed ``UnisegHubError`` naming the problem, never a traceback, a huge allocation or a
silently wrong result."""

import json
import shutil
from collections import OrderedDict

import pytest
import torch
from conftest import SMALL

from uniseg_hub import load_encoder, load_model
from uniseg_hub.config import UniSegConfig
from uniseg_hub.errors import ConfigError, IncompatibleCheckpointError, ManifestError
from uniseg_hub.weights import (
    convert_checkpoint,
    read_folder,
    read_official_checkpoint,
    read_safetensors,
    save_folder,
)

from official_format import official_shapes, save_official_checkpoint, seeded_state_dict

# ----------------------------------------------------------------------------------------------- checkpoints


def _folder_with(converted, tmp_path, change) -> "Path":  # noqa: F821
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


def _with_config(converted, tmp_path, text) -> "Path":  # noqa: F821
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
    import uniseg_hub.pretrained as pretrained

    def no_build(*args, **kwargs):
        raise AssertionError("a network was built")

    monkeypatch.setattr(pretrained, "build_network", no_build)
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
    from uniseg_hub.hub.manifest import packaged_manifest

    return next(iter(packaged_manifest().models.values())).to_dict()


@pytest.mark.parametrize("filename", [
    "..\\..\\evil.safetensors", "a\\..\\b.safetensors", "C:/x.safetensors", "c:evil.safetensors",
    "a//b.safetensors", "./model.safetensors", "a/./b.safetensors", "../model.safetensors", "/model.safetensors",
    "a/\x00.safetensors", "model.bin", "",
])
def test_manifest_filename_cannot_leave_the_repository(filename):
    from uniseg_hub.hub.manifest import parse_manifest

    entry = {**_manifest_entry(), "filename": filename}
    with pytest.raises(ManifestError, match="filename"):
        parse_manifest({"schema_version": 1, "models": [entry]})


def test_manifest_nested_deeply_is_a_manifest_error(tmp_path):
    from uniseg_hub.hub.manifest import load_manifest

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
