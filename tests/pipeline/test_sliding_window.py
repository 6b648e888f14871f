"""The sliding window held to nnU-Net v1 itself (``nnunet==1.7.1``, whose ``SegmentationNetwork`` UniSeg keeps
unchanged apart from passing the task id): window positions, Gaussian importance map, and the whole tiled
prediction (softmax, 8-flip mirroring, weighting, padding) on a small seeded UniSeg."""

import itertools
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.bundle import run as bundle_run
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer

from uniseg_hub import load_model
from uniseg_hub.app.predict import bundle_overrides
from uniseg_hub.config import PredictOptions
from uniseg_hub.errors import ConfigError, InputShapeError
from uniseg_hub.pipeline import TaskPredictor
from uniseg_hub.pipeline.sliding_window import (
    NnUNetSlidingWindowInferer,
    NnUNetSplitter,
    WeightedMerger,
    importance_map,
    window_starts,
)
from uniseg_hub.tasks import get_task

neural_network = pytest.importorskip("nnunet.network_architecture.neural_network")
Reference = neural_network.SegmentationNetwork

SIZES = [1, 5, 31, 32, 33, 63, 64, 65, 96, 110, 127, 128, 129, 191, 192, 193, 255, 300, 383, 512, 517]
PATCHES = [1, 2, 5, 16, 32, 33, 64, 96, 192]
# our overlap o is nnU-Net's step_size 1 - o (computed as such: 1 - (1 - 0.1) is not 0.1 in floating point)
OVERLAPS = [0.0, 0.25, 0.5, 0.7, 0.75, 0.9]


@pytest.mark.parametrize("overlap", OVERLAPS)
def test_window_positions_equal_nnunet_for_many_sizes(overlap):
    checked = 0
    for size, patch in itertools.product(SIZES, PATCHES):
        padded = max(size, patch)  # nnU-Net pads the image to the patch before placing windows
        expected = Reference._compute_steps_for_sliding_window((patch,), (padded,), 1 - overlap)
        assert window_starts((padded,), (patch,), overlap) == expected, (size, patch, overlap)
        checked += 1
    assert checked == len(SIZES) * len(PATCHES)


@pytest.mark.parametrize("image, patch", [((64, 192, 192), (64, 192, 192)), ((80, 250, 250), (64, 192, 192)),
                                          ((150, 512, 517), (64, 192, 192)), ((30, 100, 100), (64, 192, 192)),
                                          ((517, 512, 150), (192, 192, 64)), ((65, 63, 33), (32, 64, 64))])
def test_window_positions_equal_nnunet_for_anisotropic_patches(image, patch):
    padded = tuple(max(i, p) for i, p in zip(image, patch))
    assert window_starts(padded, patch) == Reference._compute_steps_for_sliding_window(patch, padded, 0.5)


def test_the_windows_are_at_most_half_a_patch_apart_and_cover_the_image():
    # (a 1-voxel patch gets repeated windows half a voxel apart, in nnU-Net too)
    for size, patch in itertools.product(SIZES, PATCHES[1:]):
        starts = window_starts((max(size, patch),), (patch,), 0.5)[0]
        assert starts[0] == 0 and starts[-1] == max(size, patch) - patch
        assert all(0 < b - a <= patch / 2 + 0.5 for a, b in zip(starts, starts[1:])), (size, patch, starts)


@pytest.mark.parametrize("patch", [(64, 192, 192), (192, 192, 64), (64, 64, 32), (33, 17, 64), (5, 7, 9),
                                   (1, 2, 3), (2, 2, 2)])
def test_importance_map_equals_nnunet_within_1e6(patch):
    expected = Reference._get_gaussian(patch, sigma_scale=1.0 / 8)
    ours = importance_map(patch)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == patch
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-6)
    assert float(ours.max()) == 1.0 and ours[tuple(p // 2 for p in patch)] == 1.0
    assert float(ours.min()) > 0
    # the map differs from MONAI's (centred at (p - 1) / 2, clamped to 1e-3): the reason for our own inferer
    from monai.data.utils import compute_importance_map

    if patch == (64, 64, 32):
        monai_map = compute_importance_map(patch, mode="gaussian", sigma_scale=0.125)
        assert float((monai_map - ours).abs().max()) > 1e-2


def test_a_wrong_overlap_is_a_config_error():
    for overlap in (1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="overlap"):
            NnUNetSlidingWindowInferer((8, 8, 8), overlap=overlap)


class _Official(Reference):
    """The smallest ``SegmentationNetwork`` that runs nnU-Net's own tiled prediction on our network: the official
    ``UniSeg_model.forward`` returns the task's logits (all head channels) and nnU-Net applies the softmax."""

    def __init__(self, model, task):
        super().__init__()
        self.model, self.task = model, task
        self.num_classes = 4
        self.conv_op = torch.nn.Conv3d
        self.inference_apply_nonlin = lambda x: torch.softmax(x, 1)

    def forward(self, x):
        return self.model(x, self.task)


@pytest.fixture(scope="module")
def small_model(converted_small):
    torch.manual_seed(0)
    return load_model(converted_small, device="cpu").eval()


@pytest.mark.parametrize("shape, tta", [((64, 60, 55), False), ((50, 100, 20), False),
                                        pytest.param((70, 50, 32), True, marks=pytest.mark.slow)])
def test_tiled_prediction_equals_nnunet_within_1e5(small_model, shape, tta):
    """Our inferer with ``TaskPredictor`` vs nnU-Net v1's ``_internal_predict_3D_3Dconv_tiled`` (Gaussian, step 0.5,
    constant 0 padding, mirroring on the three axes): same softmax within 1e-5. (50, 100, 20) is smaller than the
    patch (64, 64, 32) along two axes: padded, centred, and cropped back. Both run the plain network (the CPU fast
    path differs from it by up to about 7e-6 on its own, which would hide what this test is about), one window per call
    as nnU-Net (this small random network's convolutions round differently in a batch of two, by up to 1e-5)."""
    task = get_task("liver")
    image = torch.from_numpy(np.random.default_rng(1).uniform(0, 1, size=(1, *shape)).astype(np.float32))
    reference = _Official(small_model, task.id)
    with torch.no_grad():
        _, expected = reference._internal_predict_3D_3Dconv_tiled(
            image.numpy(), 0.5, tta, (0, 1, 2), small_model.patch_size, None, True, "constant",
            {"constant_values": 0}, False, False)
        predictor = TaskPredictor(small_model, [task], mirror=tta, crop_classes=False, cpu_fast_path=False)
        inferer = NnUNetSlidingWindowInferer(small_model.patch_size, sw_batch_size=1, overlap=0.5)
        ours = inferer(MetaTensor(image[None], affine=torch.eye(4)), predictor)
    assert isinstance(ours, MetaTensor) and ours.shape == (1, 4, *shape)
    np.testing.assert_allclose(ours[0].numpy(), expected, rtol=0, atol=1e-5)
    print(f"largest difference to nnU-Net: {np.abs(ours[0].numpy() - expected).max():.1e}")
    # MONAI's sliding window (other positions and map) is measurably different on the same image
    if shape == (64, 60, 55):  # z: windows at 0, 12, 23 here, at 0, 16, 23 in MONAI
        with torch.no_grad():
            monai = SlidingWindowInferer(small_model.patch_size, overlap=0.5, mode="gaussian", sigma_scale=0.125)(
                image[None], predictor)
        assert float((monai[0] - torch.from_numpy(expected)).abs().max()) > 1e-4


def test_one_window_is_not_weighted_and_the_count_matches(small_model):
    inferer = NnUNetSlidingWindowInferer(small_model.patch_size, sw_batch_size=3, progress="true")
    assert inferer.count(small_model.patch_size) == 1 and inferer.count((40, 10, 5)) == 1
    assert inferer.count((90, 70, 45)) == 8 and inferer.count((96, 64, 32)) == 2
    seen = []
    x = torch.rand(1, 1, 40, 70, 32)
    out = inferer(x, lambda w: seen.append(tuple(w.shape)) or torch.cat([w, 2 * w], 1))
    assert seen == [(2, 1, 64, 64, 32)]  # 40 padded to 64, 70 -> 2 windows, 32 -> 1; one call (batch of 3)
    torch.testing.assert_close(out, torch.cat([x, 2 * x], 1), rtol=1e-6, atol=1e-6)  # identity net: weights cancel


ROOT = Path(__file__).resolve().parents[2]
INFERENCE = ROOT / "bundle" / "configs" / "inference.json"


def bundle_parser(weights, **overrides):
    parser = ConfigParser()
    parser.read_config(str(INFERENCE))
    parser.update({"bundle_root": str(ROOT / "bundle"), "weights": str(weights), **overrides})
    return parser


def test_the_bundle_and_predict_take_the_window_option(converted_small):
    default = bundle_parser(converted_small).get_parsed_content("inferer")
    assert isinstance(default, NnUNetSlidingWindowInferer) and default.overlap == 0.5
    assert default.roi_size == (64, 64, 32)
    monai = bundle_parser(converted_small, window="MONAI", overlap=0.25).get_parsed_content("inferer")
    assert type(monai) is SlidingWindowInferer and monai.overlap == 0.25
    with pytest.raises(RuntimeError) as err:  # MONAI's parser wraps what the expression raised
        bundle_parser(converted_small, window="gaussian").get_parsed_content("inferer")
    assert isinstance(err.value.__cause__, ConfigError) and "window must be one of nnunet, monai" in str(
        err.value.__cause__)
    assert PredictOptions().window == "nnunet" and PredictOptions(window=" Monai ").window == "monai"
    with pytest.raises(ConfigError, match="window"):
        PredictOptions(window="nnunet2")
    assert bundle_overrides(PredictOptions(window="monai"), ["a.nii.gz"])["window"] == "monai"


@pytest.mark.slow
def test_the_bundle_runs_with_either_window_and_they_differ(converted_small, tmp_path):
    """Through ``monai.bundle run``: both windows segment an image of 2 x 2 x 3 windows (liver spacing, no
    resampling); the nnunet window's probabilities equal our inferer's on the preprocessed image, MONAI's differ."""
    hu = np.random.default_rng(2).uniform(-300, 300, size=(80, 70, 55)).astype(np.float32)
    path = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(hu, np.diag([1.5, 1.5, 3.0, 1.0])), path)
    probabilities = {}
    for window in ("nnunet", "monai"):
        bundle_run(config_file=str(INFERENCE), bundle_root=str(ROOT / "bundle"), weights=str(converted_small),
                   input=str(path), task="liver", tta=False, save_probabilities=True, window=window,
                   output_dir=str(tmp_path / window))
        labels = nib.load(tmp_path / window / "case_liver.nii.gz")
        assert labels.shape == hu.shape
        probabilities[window] = np.asanyarray(nib.load(tmp_path / window / "case_liver_probabilities.nii.gz").dataobj)
    assert probabilities["nnunet"].shape[:3] == hu.shape
    assert np.abs(probabilities["nnunet"] - probabilities["monai"]).max() > 1e-4
    parser = bundle_parser(converted_small, input=str(path), task="liver", tta=False)
    image = parser.get_parsed_content("preprocessing")({"image": str(path)})["image"]
    assert tuple(image.shape[1:]) == hu.shape  # the grid is the task's: no resampling, so no interpolation below
    with torch.no_grad():
        ours = NnUNetSlidingWindowInferer((64, 64, 32))(image[None], parser.get_parsed_content("predictor"))
    np.testing.assert_allclose(np.moveaxis(probabilities["nnunet"].reshape(*hu.shape, -1), -1, 0), ours[0].numpy(),
                               rtol=0, atol=1e-5)


def test_the_command_line_takes_window_and_refuses_a_wrong_one_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "uniseg_hub", "predict", str(tmp_path / "scan.nii.gz"), "--window",
                             "gaussian", "--out", str(tmp_path / "out")], capture_output=True, text=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "window must be one of nnunet, monai" in lines[0]
    assert not (tmp_path / "out").exists()


def test_wrong_inputs_are_typed_errors():
    inferer = NnUNetSlidingWindowInferer((8, 8, 8))
    with pytest.raises(InputShapeError, match="spatial axes"):
        inferer(torch.zeros(1, 1, 8, 8), lambda x: x)
    with pytest.raises(InputShapeError, match="smaller than the patch"):
        list(NnUNetSplitter((8, 8, 8))(torch.zeros(1, 1, 8, 4, 8)))
    with pytest.raises(InputShapeError):
        window_starts((8, 8), (8, 8, 8))
    with pytest.raises(ConfigError, match="importance map"):
        WeightedMerger((1, 1, 8, 8, 8))


def test_a_long_sliding_window_announces_its_duration_after_the_first_window(monkeypatch, caplog):
    """The expected time is the first window's (measured) times the count, logged as one note above a minute."""
    import logging

    from uniseg_hub.pipeline import sliding_window

    clock = iter(range(0, 1000, 10))  # every reading of the clock is 10 s later: the first window takes 10 s
    monkeypatch.setattr(sliding_window, "perf_counter", lambda: float(next(clock)))
    inferer = NnUNetSlidingWindowInferer((8, 8, 8), overlap=0.5)
    image = torch.zeros(1, 1, 32, 8, 8)  # 7 windows along the first axis
    with caplog.at_level(logging.INFO, logger="uniseg_hub.pipeline.sliding_window"):
        inferer(image, lambda x: x)
    notes = [r for r in caplog.records if getattr(r, "note", False)]
    assert len(notes) == 1 and "about 1 min (7 windows x 10.0 s" in notes[0].getMessage()
    assert sliding_window.announce_duration(10.0, 6) == 60.0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="uniseg_hub.pipeline.sliding_window"):
        sliding_window.announce_duration(10.0, 6)  # a minute or less: nothing to announce
        sliding_window.announce_duration(1.0, 2000)
    assert [r.getMessage() for r in caplog.records] == [
        "the sliding window will take about 33 min (2000 windows x 1.0 s, measured on the first)"]


def test_the_command_line_shows_the_duration_as_one_note_line(capsys):
    import logging

    from uniseg_hub import cli
    from uniseg_hub.pipeline import sliding_window

    handler = cli._WarningLines(logging.INFO)
    sliding_window.logger.addHandler(handler)
    sliding_window.logger.setLevel(logging.INFO)
    try:
        sliding_window.announce_duration(30.0, 12)
        logging.getLogger("uniseg_hub.pipeline.sliding_window").info("not a note")
    finally:
        sliding_window.logger.removeHandler(handler)
        sliding_window.logger.setLevel(logging.NOTSET)
    out, err = capsys.readouterr()
    assert out == "" and err == "note: the sliding window will take about 6 min (12 windows x 30.0 s, measured on " \
                                "the first)\n"
