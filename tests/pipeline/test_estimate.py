"""The run-time estimate: sliding-window positions as the inferer runs them, one window timed."""

import time

import pytest
import torch

from uniseg_hub.networks import UniSeg
from uniseg_hub.pipeline import resolve_tasks
from uniseg_hub.pipeline.estimate import WindowTimes, estimate_run, time_window, window_positions
from uniseg_hub.pipeline.resampling import resampled_shape
from uniseg_hub.pipeline.sliding_window import NnUNetSlidingWindowInferer
from uniseg_hub.tasks import get_task

SMALL_PATCH = (64, 64, 32)


def positions_run(shape, patch, overlap):
    """How many windows the bundle's default inferer (nnU-Net's positions) hands the network for ``shape``."""
    calls = []

    def network(x):
        calls.append(x.shape[0])
        return x

    NnUNetSlidingWindowInferer(patch, sw_batch_size=1, overlap=overlap)(torch.zeros(1, 1, *shape), network)
    return sum(calls)


@pytest.mark.parametrize("shape, spacing, target, patch, overlap", [
    ((122, 101, 30), (3.0, 3.0, 3.0), (1.5, 1.5, 3.0), (192, 192, 64), 0.5),  # the demo's scan, official patch
    ((122, 101, 30), (3.0, 3.0, 3.0), (1.5, 1.5, 3.0), (64, 64, 32), 0.5),
    ((60, 50, 40), (1.0, 1.0, 2.5), (1.5, 1.5, 3.0), (32, 32, 16), 0.25),
    ((20, 20, 20), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), (32, 32, 32), 0.5),  # smaller than the patch: one window
    ((97, 33, 64), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), (32, 32, 32), 0.0),
    # a step p * 0.7 = 134.4 that is not whole: nnU-Net places 4 windows along the first axis, MONAI's rule 5
    ((595, 20, 20), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), (192, 32, 32), 0.3),
])
def test_window_positions_are_those_the_inferer_runs(shape, spacing, target, patch, overlap):
    expected = positions_run(resampled_shape(shape, spacing, target), patch, overlap)
    assert window_positions(shape, spacing, target, patch, overlap) == expected


def test_demo_scan_takes_four_official_windows():
    assert window_positions((122, 101, 30), (3.0, 3.0, 3.0), (1.5, 1.5, 3.0), (192, 192, 64)) == 2 * 2 * 1


def test_estimate_multiplies_windows_by_timed_passes():
    times = WindowTimes(encode=2.0, decode=0.5, device="cpu")
    assert times.window() == 2.5 and times.window(tasks=8) == 6.0 and times.window(8, mirror=True) == 48.0
    liver = estimate_run((122, 101, 30), (3.0, 3.0, 3.0), resolve_tasks("liver"), (192, 192, 64), times)
    every = estimate_run((122, 101, 30), (3.0, 3.0, 3.0), resolve_tasks("all"), (192, 192, 64), times, mirror=True)
    assert (liver.task, liver.tasks, liver.windows, liver.seconds) == ("liver", 1, 4, 10.0)
    assert (every.task, every.tasks, every.passes_per_window, every.seconds) == ("all", 8, 8, 4 * 48.0)


class SleepyNetwork(torch.nn.Module):
    """Encoder and decoder of known durations; the first pass is slow (one-off costs)."""

    patch_size = (8, 8, 8)

    def __init__(self, encode_s, decode_s):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.durations, self.calls = (encode_s, decode_s), []

    def encode(self, x):
        self.calls.append(("encode", tuple(x.shape)))
        time.sleep(self.durations[0] * (5 if len(self.calls) == 1 else 1))
        return [x]

    def decode_tasks(self, features, tasks):
        self.calls.append(("decode", tuple(tasks)))
        time.sleep(self.durations[1] * len(tasks))
        return [features[0]]


def test_time_window_times_encoder_and_one_decoder_after_a_warmup():
    network = SleepyNetwork(0.2, 0.1)
    times = time_window(network, get_task("kidney"), device="cpu", cpu_fast_path=False)
    assert network.calls == [("encode", (1, 1, 8, 8, 8)), ("decode", (1,))] * 2
    assert times.device == "cpu"
    assert times.encode == pytest.approx(0.2, abs=0.08) and times.decode == pytest.approx(0.1, abs=0.08)


def test_time_window_runs_the_real_network():
    model = UniSeg(features=(4, 8, 16, 16, 16, 16), patch_size=SMALL_PATCH).eval()
    times = time_window(model, get_task("liver"), device="cpu")
    assert times.encode > 0 and times.decode > 0
