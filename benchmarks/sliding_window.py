#!/usr/bin/env python
"""The official (nnU-Net v1) sliding window against MONAI's default, on realistic preprocessed sizes: prints one table.

    python benchmarks/sliding_window.py             # about 6 min on 2 shared CPU cores
    python benchmarks/sliding_window.py --repeats 2

For each image size (spatial shapes at the liver task's spacing, MONAI axis order, full-size patch (192, 192, 64),
overlap 0.5, no TTA): the number of windows and where they start along each axis, the wall time of
``pipeline.NnUNetSlidingWindowInferer`` and of MONAI's ``SlidingWindowInferer`` (Gaussian, sigma 1/8: what the
bundle ran before) with

* ``small``: a small UniSeg of the full patch (features 4-8-16-16-16-16, random seeded weights, softmax through
  ``TaskPredictor``), so the network is cheap and the inferers' own costs show;
* ``none``: a network that costs nothing (it returns its input twice): the inferers' own costs alone,

after a warm-up, interleaved (every repeat runs both inferers, in alternating order), best of the repeats; and the
largest difference between the two inferers' softmax and the share of voxels whose argmax differs (random weights:
near-uniform probabilities, so this share overstates what a trained model would show). The Gaussian map: ours
(MONAI's ``gaussian_1d``, cached) against nnU-Net v1's ``_get_gaussian`` (scipy, when ``nnunet`` is installed).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from monai.inferers import SlidingWindowInferer

from uniseg_hub.networks import UniSeg
from uniseg_hub.pipeline import TaskPredictor
from uniseg_hub.pipeline.sliding_window import NnUNetSlidingWindowInferer, _importance_map, window_starts
from uniseg_hub.tasks import get_task

PATCH = (192, 192, 64)
SIZES = {
    "torso CT 233x167x191 @1.5 mm": (233, 167, 96),   # the TotalSegmentator example, 3 mm slices at liver spacing
    "CT 512x512x300 @0.7x0.7x1 mm": (239, 239, 100),  # a typical abdominal CT at the liver task's spacing
    "small MR crop": (120, 150, 40),                   # smaller than the patch along two axes: padded
}


def monai_starts(size, patch, overlap=0.5):
    """MONAI's positions (``dense_patch_slices``): a fixed step ``int(patch * (1 - overlap))``, last at the border."""
    from monai.data.utils import dense_patch_slices

    padded = tuple(max(s, p) for s, p in zip(size, patch))
    step = tuple(max(int(p * (1 - overlap)), 1) for p in patch)
    slices = dense_patch_slices(padded, patch, step)
    return [sorted({int(s[d].start) for s in slices}) for d in range(len(patch))]


def best(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = UniSeg(features=(4, 8, 16, 16, 16, 16), patch_size=PATCH).eval()
    networks = {"small": TaskPredictor(model, [get_task("liver")], mirror=False),
                "none": lambda x: torch.cat([x, x], 1)}
    ours = NnUNetSlidingWindowInferer(PATCH, overlap=0.5)
    monai = SlidingWindowInferer(PATCH, overlap=0.5, mode="gaussian", sigma_scale=0.125, padding_mode="constant")

    with torch.no_grad():  # warm-up: the first call of a network pays for oneDNN's kernel creation
        networks["small"](torch.rand(1, 1, *PATCH))
    rows = []
    for name, size in SIZES.items():
        x = torch.rand(1, 1, *size)
        nn_starts = window_starts(tuple(max(s, p) for s, p in zip(size, PATCH)), PATCH)
        mo_starts = monai_starts(size, PATCH)
        row = {"image": name, "shape": size, "starts": (nn_starts, mo_starts),
               "windows": (math.prod(map(len, nn_starts)), math.prod(map(len, mo_starts)))}
        with torch.no_grad():
            for label, net in networks.items():
                times = {"nnunet": math.inf, "monai": math.inf}
                outputs = {}
                for repeat in range(args.repeats):  # interleaved, order alternating: a change of load hits both
                    for key in (("nnunet", "monai") if repeat % 2 == 0 else ("monai", "nnunet")):
                        inferer = ours if key == "nnunet" else monai
                        t, outputs[key] = best(lambda: inferer(x, net), 1)
                        times[key] = min(times[key], t)
                row[label] = (times["nnunet"], times["monai"])
                a, b = outputs["nnunet"], outputs["monai"]
                if label == "small":
                    row["max_diff"] = float((a - b).abs().max())
                    row["argmax_diff"] = float((a.argmax(1) != b.argmax(1)).float().mean())
        rows.append(row)
        print(f"done: {name}", flush=True)

    _importance_map.cache_clear()
    t_map, _ = best(lambda: _importance_map(PATCH, 0.125), 1)
    t_ref = None
    try:
        from nnunet.network_architecture.neural_network import SegmentationNetwork

        t_ref, _ = best(lambda: SegmentationNetwork._get_gaussian(PATCH, 1 / 8), 1)
    except ImportError:
        pass

    print()
    print(f"patch {PATCH}, overlap 0.5, no TTA, {torch.get_num_threads()} threads, best of {args.repeats}")
    print("| image (shape at liver spacing) | windows nnunet / monai | starts nnunet | starts monai "
          "| small UniSeg: nnunet / monai | network-free: nnunet / monai | max softmax diff | argmax differs |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['image']} {r['shape']} | {r['windows'][0]} / {r['windows'][1]} | {r['starts'][0]} "
              f"| {r['starts'][1]} | {r['small'][0]:.2f} s / {r['small'][1]:.2f} s "
              f"| {r['none'][0]:.2f} s / {r['none'][1]:.2f} s | {r['max_diff']:.1e} | {100 * r['argmax_diff']:.2f} % |")
    ref = f"{t_ref:.2f} s" if t_ref is not None else "nnunet not installed"
    print(f"Gaussian map {PATCH}: ours {t_map:.2f} s (once per patch size, cached), nnU-Net v1 scipy {ref}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
