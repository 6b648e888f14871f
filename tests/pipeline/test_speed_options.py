"""Speed options (issue 17): precision, test-time augmentation levels, the --fast preset.

Small configurations; every option is checked for what it changes (flips run, dtype of the arithmetic, weights'
dtype, bundle overrides, command-line parsing) and that the defaults stay the official behaviour. No timing here:
speed and agreement on the sample CT are the benchmark's job (``benchmarks/run.py --sections precision,agreement``).
"""

import logging

import pytest
import torch

from uniseg_hub import cli, load_model
from uniseg_hub.app.predict import bundle_overrides
from uniseg_hub.config import FAST_PRESET, PredictOptions, parse_precision, parse_tta
from uniseg_hub.cpu import fast_path
from uniseg_hub.errors import ConfigError
from uniseg_hub.networks import UniSeg
from uniseg_hub.pipeline import TaskPredictor, predictor
from uniseg_hub.pipeline.predictor import autocast_dtype, mirror_axes
from uniseg_hub.pretrained import _weights_dtype
from uniseg_hub.tasks import get_task

FEATURES = (16, 16, 16, 16, 16, 16)
PATCH = (32, 32, 32)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UniSeg(features=FEATURES, patch_size=PATCH).eval()


@pytest.fixture(scope="module")
def image():
    return torch.randn(1, 1, *PATCH, generator=torch.Generator().manual_seed(1))


# --- TTA levels ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, level", [(8, 8), ("4", 4), (2, 2), ("1", 1), (True, 8), (False, 1), ("true", 8),
                                          ("no", 1), ("0", 1), (" 8 ", 8)])
def test_tta_levels_and_the_former_switch_spellings(value, level):
    assert parse_tta(value) == level


@pytest.mark.parametrize("value", [3, "16", "maybe", 0.5, -1, "8.0"])
def test_other_tta_values_are_refused(value):
    with pytest.raises(ConfigError, match="8, 4, 2 or 1"):
        parse_tta(value)


def test_each_level_flips_a_subset_of_the_official_eight():
    eight = mirror_axes(8)
    assert eight == mirror_axes(True) and len(set(eight)) == 8
    assert mirror_axes(4) == [(), (2,), (3,), (2, 3)]
    assert mirror_axes(2) == [(), (2,)]
    assert mirror_axes(1) == mirror_axes(False) == [()]
    for level in (4, 2, 1):
        assert set(mirror_axes(level)) <= set(eight)


def test_a_level_averages_exactly_its_flips(model, image):
    """The level-4 prediction is the mean of the softmax of its four flips, computed here by hand."""
    task = get_task("liver")
    with torch.no_grad():
        ours = TaskPredictor(model, [task], mirror=4, cpu_fast_path=False)(image)
        manual = sum(torch.flip(model(torch.flip(image, axes), task.id).softmax(1), axes) if axes else
                     model(image, task.id).softmax(1) for axes in [(), (2,), (3,), (2, 3)]) / 4
        one = TaskPredictor(model, [task], mirror=1, cpu_fast_path=False)(image)
        off = TaskPredictor(model, [task], mirror=False, cpu_fast_path=False)(image)
    torch.testing.assert_close(ours, manual[:, : task.num_classes], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(one, off, rtol=0, atol=0)
    assert not torch.allclose(ours, one, atol=1e-6)


# --- precision ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, name", [(None, "auto"), ("AUTO", "auto"), ("float32", "fp32"), ("bfloat16", "bf16"),
                                         ("torch.float16", "fp16"), ("half", "fp16"), (" bf16 ", "bf16")])
def test_precision_names(value, name):
    assert parse_precision(value) == name


def test_unknown_precision_is_refused():
    with pytest.raises(ConfigError, match="precision must be one of auto, fp32, bf16, fp16"):
        parse_precision("fp8")


def test_defaults_are_the_official_inference():
    assert autocast_dtype("auto", "cpu", amp=True) is None  # CPU: float32, even with the bundle's amp switch
    assert autocast_dtype("auto", "cuda", amp=True) is torch.float16  # CUDA: the official float16 autocast
    assert autocast_dtype("auto", "cuda", amp=False) is None
    assert autocast_dtype("fp32", "cuda", amp=True) is None
    assert autocast_dtype("bf16", "cuda") is torch.bfloat16
    assert PredictOptions().precision == "auto" and PredictOptions().tta == 8 and PredictOptions().overlap == 0.5


def test_fp16_on_cpu_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="fp16 runs on CUDA only"):
        autocast_dtype("fp16", "cpu")


def test_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch, caplog):
    monkeypatch.setattr(predictor, "native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger=predictor.__name__):
        assert autocast_dtype("bf16", "cpu") is torch.bfloat16
    assert len(caplog.records) == 1 and "no native bfloat16" in caplog.records[0].getMessage()
    monkeypatch.setattr(predictor, "native_bf16", lambda: True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=predictor.__name__):
        autocast_dtype("bf16", "cpu")
    assert not caplog.records


def test_bf16_runs_the_network_in_bfloat16_and_stays_close(model, image, monkeypatch):
    monkeypatch.setattr(predictor, "native_bf16", lambda: True)
    task = get_task("liver")
    seen = []
    hook = model.encoder.register_forward_hook(lambda m, i, o: seen.append(o[-1].dtype))
    try:
        with torch.no_grad():
            reference = TaskPredictor(model, [task], mirror=1, cpu_fast_path=False)(image)
            bf16 = TaskPredictor(model, [task], mirror=1, precision="bf16", cpu_fast_path=False)(image)
            fast = TaskPredictor(model, [task], mirror=1, precision="bf16")(image)  # the CPU fast path, in bf16
    finally:
        hook.remove()
    assert seen == [torch.float32, torch.bfloat16]  # the fast path runs the encoder stage by stage: no hook
    assert 0 < (fast - reference).abs().max() < 0.05 and (fast - bf16).abs().max() < 0.05
    assert bf16.dtype == torch.float32 and bf16.shape == reference.shape
    assert 0 < (bf16 - reference).abs().max() < 0.05  # bfloat16 arithmetic (changed), same result to ~1e-2
    assert (bf16.argmax(1) == reference.argmax(1)).float().mean() > 0.95


def test_the_cpu_fast_path_runs_under_bf16_autocast_and_steps_aside_under_float16(image):
    with torch.no_grad():
        assert fast_path.active(image)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert fast_path.active(image) and fast_path.active(image.bfloat16())  # bf16 maps for the decoder
        with torch.autocast("cpu", dtype=torch.float16):
            assert not fast_path.active(image)
        assert not fast_path.active(image.bfloat16())  # bfloat16 weights and input: the plain model


@pytest.mark.parametrize("dtype, expected", [("bf16", torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                             ("fp16", torch.float16), ("fp32", None), (None, None)])
def test_load_model_dtype_names(dtype, expected):
    assert _weights_dtype(dtype) == expected


def test_load_model_casts_the_weights_and_a_predictor_feeds_them(converted_small, monkeypatch):
    model = load_model(converted_small, dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    reference = load_model(converted_small)
    x = torch.randn(1, 1, *reference.patch_size, generator=torch.Generator().manual_seed(2))
    task = get_task("liver")
    with torch.no_grad():
        ours = TaskPredictor(model, [task], mirror=1)(x)
        theirs = TaskPredictor(reference, [task], mirror=1)(x)
    assert ours.dtype == torch.float32
    assert (ours.argmax(1) == theirs.argmax(1)).float().mean() > 0.9


@pytest.mark.parametrize("dtype", ["auto", "int8", torch.int64])
def test_load_model_refuses_other_dtypes(dtype):
    with pytest.raises(ConfigError, match="dtype must be"):
        _weights_dtype(dtype)


# --- options, bundle overrides, command line ----------------------------------------------------------------------

def test_fast_preset_replaces_only_the_official_defaults():
    fast = PredictOptions(fast=True)
    assert (fast.tta, fast.overlap) == (FAST_PRESET["tta"], FAST_PRESET["overlap"])
    chosen = PredictOptions(fast="true", tta=4, overlap=0.6)
    assert (chosen.tta, chosen.overlap) == (4, 0.6)
    assert PredictOptions(tta="false").tta == 1 and PredictOptions(tta=True).tta == 8


def test_bundle_overrides_carry_the_speed_options():
    overrides = bundle_overrides(PredictOptions(tta="2", precision="bf16"), ["scan.nii.gz"])
    assert overrides["tta"] == 2 and overrides["precision"] == "bf16"
    assert bundle_overrides(PredictOptions(), ["scan.nii.gz"])["precision"] == "auto"


@pytest.mark.parametrize("args, tta", [(["--tta", "4", "scan.nii.gz"], "'4'"), (["--tta", "scan.nii.gz"], "'True'"),
                                       (["--notta", "scan.nii.gz"], "'False'"), (["--tta", "1", "scan.nii.gz"], "'1'"),
                                       (["--tta=2", "scan.nii.gz"], "'2'"), (["scan.nii.gz", "--tta", "no"], "'no'")])
def test_cli_tta_takes_a_level_or_a_switch_and_keeps_the_input(args, tta):
    out = cli.guard_args("predict", args)
    assert f"--tta={tta}" in out and "'scan.nii.gz'" in out


def test_cli_fast_and_precision_options():
    out = cli.guard_args("predict", ["scan.nii.gz", "--fast", "--precision", "bf16"])
    assert "--fast=True" in out and "--precision='bf16'" in out


# --- device-agnostic pieces and the compile option (the CUDA runs themselves: tests/cuda, benchmarks/gpu.sh) --------

def test_resampling_back_runs_on_the_predictions_device():
    """The matrices are built on the CPU; the products run where the prediction is (``meta`` stands in for CUDA)."""
    from uniseg_hub.pipeline.resampling import resample_separable

    data = torch.empty(2, 4, 5, 6, device="meta")
    matrices = [torch.rand(8, 4, dtype=torch.float64), None, torch.rand(3, 6, dtype=torch.float64)]
    out = resample_separable(data, matrices)
    assert out.device.type == "meta" and tuple(out.shape) == (2, 8, 5, 3)


@pytest.mark.parametrize("value, mode", [(False, None), ("false", None), (True, "default"),
                                         ("reduce-overhead", "reduce-overhead"), ("MAX-AUTOTUNE", "max-autotune")])
def test_compile_option_compiles_the_per_flip_call(value, mode, model, image, monkeypatch):
    compiled = []

    def fake_compile(fn, mode=None):
        compiled.append(mode)
        return lambda x: fn(x) * 1  # stands in for the compiled function: called on every flip

    monkeypatch.setattr(torch, "compile", fake_compile)
    predictor_ = TaskPredictor(model, [get_task("liver")], mirror=2, compile=value, cpu_fast_path=False)
    with torch.no_grad():
        predictor_(image)
    assert compiled == ([] if mode is None else [mode])


def test_unknown_compile_mode_is_refused(model):
    with pytest.raises(ConfigError, match="compile must be"):
        TaskPredictor(model, [get_task("liver")], compile="turbo")


# --- the bundle end to end: the options reach the predictor ------------------------------------------------------

@pytest.mark.slow
def test_predict_passes_levels_precision_and_fast_to_the_bundle(converted_small, tmp_path, monkeypatch):
    """``predict`` on a real CT crop: the bundle builds its predictor with the chosen flips and precision."""
    from uniseg_hub import pipeline
    from uniseg_hub.app.predict import predict

    from scans import crop, sample

    ct = crop(sample("ct_small"), tmp_path / "abdomen.nii.gz", (slice(20, 60), slice(30, 70), slice(8, 24)))
    built = []

    class Recording(pipeline.TaskPredictor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append((len(self.flips), self.precision, self.compile_mode))

    monkeypatch.setattr(pipeline, "TaskPredictor", Recording)
    monkeypatch.setattr(predictor, "native_bf16", lambda: True)
    options = dict(task="liver", weights=str(converted_small), device="cpu", preview=False, progress=False)
    first = predict(str(ct), out_dir=str(tmp_path / "a"), tta=2, precision="bf16", **options)
    second = predict(str(ct), out_dir=str(tmp_path / "b"), fast=True, **options)
    assert built == [(2, "bf16", None), (FAST_PRESET["tta"], "auto", None)]
    import nibabel as nib

    for result in (first, second):
        labels = nib.load(result.label_map)
        assert labels.shape == nib.load(ct).shape
