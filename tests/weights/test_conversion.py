"""Conversion of official checkpoints, safe unpickling, strict loading and the paper's transfers."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from conftest import SMALL, SMALL_PATCH
from safetensors import safe_open

from uniseg_hub import (
    IncompatibleCheckpointError,
    UniSeg,
    UniSegBackbone,
    UnsafeCheckpointError,
    UnsupportedChannelsError,
    convert_checkpoint,
    load_encoder,
    load_model,
)
from uniseg_hub.weights import official_key, read_official_checkpoint, sha256_file

from official_format import official_shapes, save_official_checkpoint, seeded_state_dict

PAPER_DROPPED = {"intermedia_prompt", *(f"seg_outputs.{u}.weight" for u in range(5))} | {
    f"fusion_layer.blocks.{i}.{m}.{p}" for i in range(3) for m in ("conv", "instnorm") for p in ("weight", "bias")
}


def test_convert_writes_safetensors_and_config(official_small, converted_small):
    path, _ = official_small
    config = json.loads((converted_small / "config.json").read_text())
    assert config["architecture"] == "UniSeg"
    assert config["config"]["patch_size"] == list(SMALL_PATCH)
    assert config["config"]["features"] == [4, 8, 16, 16, 16, 16]
    assert config["config"]["kernel_sizes"][0] == [3, 3, 1]
    assert config["config"]["strides"][1] == [2, 2, 1]
    assert config["source"]["sha256"] == sha256_file(path)
    with safe_open(converted_small / "model.safetensors", "pt") as f:
        meta = f.metadata()
        assert len(list(f.keys())) == 115
    assert json.loads(meta["uniseg_hub.architecture"])["config"] == config["config"]
    assert json.loads(meta["uniseg_hub.source"])["sha256"] == sha256_file(path)
    assert sorted(os.listdir(converted_small)) == ["config.json", "model.safetensors"]  # no temporary left


def test_axes_are_reversed_for_kernels_and_prompt(official_small, converted_small):
    _, official = official_small
    model = load_model(converted_small)
    state = model.state_dict()
    torch.testing.assert_close(state["prompt.universal"], official["intermedia_prompt"].permute(0, 1, 4, 3, 2))
    stem = official["conv_blocks_context.0.blocks.0.conv_4.weight"]  # (4, 4, 1, 3, 3) in (z, y, x)
    torch.testing.assert_close(state["encoder.stages.0.0.convs.4.weight"], stem.permute(0, 1, 4, 3, 2))
    torch.testing.assert_close(state["decoder.upsamples.4.weight"],
                               official["tu.4.weight"].permute(0, 1, 4, 3, 2))
    assert isinstance(model, UniSeg) and not model.training


def test_other_task_counts_and_head_widths_convert(tmp_path):
    shapes = official_shapes(base_features=4, max_features=16, num_tasks=5, num_classes=6, patch_zyx=(16, 64, 32))
    save_official_checkpoint(tmp_path / "m.model", seeded_state_dict(shapes, 3))
    model = load_model(convert_checkpoint(tmp_path / "m.model", tmp_path / "out"))
    assert model.num_tasks == 5 and model.patch_size == (32, 64, 16)
    with torch.no_grad():
        assert model(torch.randn(1, 2, 32, 64, 16), 4).shape == (1, 6, 32, 64, 16)


def test_downstream_checkpoint_converts_to_the_backbone(tmp_path):
    shapes = official_shapes(base_features=4, max_features=16, downstream_classes=14)
    save_official_checkpoint(tmp_path / "bt.model", seeded_state_dict(shapes, 4))
    model = load_model(convert_checkpoint(tmp_path / "bt.model", tmp_path / "bt"))
    assert isinstance(model, UniSegBackbone) and model.load_report.summary() == "loaded 102 tensors"
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 64, 32)).shape == (1, 14, 64, 64, 32)


def test_backbone_transfer_loads_exactly_the_papers_97_tensors(official_small, converted_small):
    _, official = official_small
    model = load_model(converted_small, num_classes=14)
    report = model.load_report
    expected = {official_key(k) for k in official if k not in PAPER_DROPPED}
    assert len(expected) == 97 and set(report.loaded) == expected
    assert {official_key(k) for k in PAPER_DROPPED} == set(report.skipped)
    assert report.initialised == [f"decoder.heads.{u}.weight" for u in range(5)]
    assert "decoder.upsamples.0.weight" in report.adapted
    up = official["tu.0.weight"][:-1].permute(0, 1, 4, 3, 2)  # prompt row removed, as UniSeg_Trainer_DS does
    torch.testing.assert_close(model.state_dict()["decoder.upsamples.0.weight"], up)
    assert model.decoder.heads[0].weight.shape[0] == 14


def test_encoder_native_and_adapted_stems(official_small, converted_small):
    _, official = official_small
    universal = load_model(converted_small)
    x = torch.randn(1, 2, *SMALL_PATCH)
    with torch.no_grad():
        expected = universal.encoder(x)
        encoder = load_encoder(converted_small, in_channels=2)
        for got, want in zip(encoder(x), expected):
            torch.testing.assert_close(got, want)
        assert list(encoder.in_channels) == [2] and not encoder.load_report.adapted
        adapted = load_encoder(converted_small, in_channels=3, out_indices=(-1,))
        weight = adapted.state_dict()["stages.0.0.convs.3.weight"]
        native = official["conv_blocks_context.0.blocks.0.conv_4.weight"].permute(0, 1, 4, 3, 2)
        torch.testing.assert_close(weight, native[:, :3] * 4 / 3)
        assert "stages.0.0.convs.3.weight" in adapted.load_report.adapted
        assert adapted(torch.randn(1, 3, *SMALL_PATCH))[0].shape == (1, 16, 2, 2, 2)
    for bad in (0, -1, 2.5, "1", 1000, True):
        with pytest.raises(UnsupportedChannelsError, match="1, 2 and 4"):
            load_encoder(converted_small, in_channels=bad)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    state = seeded_state_dict(official_shapes(**SMALL), 0)
    marker = tmp_path / "pwned"
    torch.save({"state_dict": state, "payload": _RunsCode(marker)}, tmp_path / "evil.model")
    with pytest.raises(UnsafeCheckpointError, match="system"):
        read_official_checkpoint(tmp_path / "evil.model")
    assert not marker.exists()
    # and a raw pickle (not a torch zip file) is refused too, without running its payload
    (tmp_path / "raw.model").write_bytes(pickle.dumps(_RunsCode(marker), protocol=2))
    with pytest.raises((UnsafeCheckpointError, IncompatibleCheckpointError)):
        read_official_checkpoint(tmp_path / "raw.model")
    assert not marker.exists()


def test_missing_and_misshaped_tensors_are_named(tmp_path):
    state = seeded_state_dict(official_shapes(**SMALL), 0)
    del state["conv_blocks_localization.2.1.blocks.0.conv.weight"]
    save_official_checkpoint(tmp_path / "missing.model", state)
    with pytest.raises(IncompatibleCheckpointError, match=r"missing 1 tensors: decoder\.blocks\.2\.1\.conv\.weight"):
        convert_checkpoint(tmp_path / "missing.model", tmp_path / "a")
    state = seeded_state_dict(official_shapes(**SMALL), 0)
    state["fusion_layer.blocks.1.conv.weight"] = torch.zeros(3, 3, 3, 3, 3)
    save_official_checkpoint(tmp_path / "bad.model", state)
    with pytest.raises(IncompatibleCheckpointError, match=r"prompt\.fusion\.1\.conv\.weight"):
        convert_checkpoint(tmp_path / "bad.model", tmp_path / "b")
    state = seeded_state_dict(official_shapes(**SMALL), 0)
    state["some_extra.weight"] = torch.zeros(2)
    save_official_checkpoint(tmp_path / "extra.model", state)
    with pytest.raises(IncompatibleCheckpointError, match="some_extra.weight"):
        convert_checkpoint(tmp_path / "extra.model", tmp_path / "c")
    assert not any((tmp_path / d).exists() for d in "abc")


def test_existing_output_is_not_overwritten_unless_asked(official_small, tmp_path):
    out = convert_checkpoint(official_small[0], tmp_path / "out")
    with pytest.raises(Exception, match="already exists"):
        convert_checkpoint(official_small[0], out)
    convert_checkpoint(official_small[0], out, overwrite=True)


def run_cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "uniseg_hub", *map(str, args)], capture_output=True, text=True,
                          **kwargs)


@pytest.mark.slow
def test_cli_convert(official_small, tmp_path):
    result = run_cli("convert", official_small[0], tmp_path / "cli", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["tensors"] == 115 and summary["sha256"] == sha256_file(tmp_path / "cli" / "model.safetensors")
    misspelt = run_cli("convert", official_small[0], tmp_path / "cli2", "--overwrit")
    assert misspelt.returncode == 2 and "--overwrit" in misspelt.stderr and not (tmp_path / "cli2").exists()
    missing = run_cli("convert", tmp_path / "nope.model", tmp_path / "cli3")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().count("\n") == 0 and "does not exist" in missing.stderr
    again = run_cli("convert", official_small[0], tmp_path / "cli")
    assert again.returncode == 1 and "already exists" in again.stderr
    helped = run_cli("convert", "--help")
    assert helped.returncode == 0 and "OUT_DIR" in helped.stdout + helped.stderr
