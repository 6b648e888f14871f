#!/usr/bin/env python
"""Agreement of the speed options with the official settings on real scans (issue 17), one table.

    python benchmarks/agreement.py                       # sample CT, liver: TTA levels 8/4/2/1, overlaps, bf16
    python benchmarks/agreement.py --precisions bf16 --levels 8,4,2,1 --overlaps 0.5,0.25,0

For each scan (the TotalSegmentator sample CTs, fetched from PyPI by sha256): the bundle's preprocessing
(``uniseg_hub.preprocess``), the bundle's sliding window (gaussian, sigma 1/8, ``inference.json``'s settings), the
resampling back to the scan's grid (``uniseg_hub.postprocess``) and the argmax, as ``predict`` does. One sliding
window pass with the official 8 flips yields every TTA level at once: each level's flips are a subset of the 8
(``pipeline.predictor.mirror_axes``), and the per-level mean of the softmax is stitched separately (the stitching
is linear, so each equals a run at that level). Every combination is compared with the official settings (8 flips,
overlap 0.5, float32 on CPU): Dice per label (labels present in either map) and voxel agreement on the input grid.
Network time per level is the sum of its flips' measured forward times in that pass.

Weights: the official checkpoint is on Google Drive, which this machine cannot reach; the figures use seeded random
weights in the official format (``benchmarks/run.py``'s checkpoint) unless ``--weights`` names real ones. The table
says which. Agreement with random weights measures how much an option moves the argmax of this network on real
intensities; with the official weights the figures must be measured again.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

SCANS = ("ct_torso_1.5mm",)
OFFICIAL = {"level": 8, "overlap": 0.5, "precision": "fp32"}


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


class LevelsPredictor:
    """The official flips once, averaged per TTA level: (B, C, *patch) -> (B, K x levels, *patch), with the forward
    time of every flip recorded (``times[axes]``)."""

    def __init__(self, model, task, levels, precision: str = "fp32", device: str = "cpu"):
        import torch

        from uniseg_hub.pipeline import TaskPredictor
        from uniseg_hub.pipeline.predictor import autocast_dtype, mirror_axes

        self.levels = list(levels)
        self.inner = TaskPredictor(model, [task], mirror=max(self.levels), precision=precision)
        self.flips = mirror_axes(max(self.levels))
        self.members = {level: set(mirror_axes(level)) for level in self.levels}
        dtype = autocast_dtype(precision, device)
        self.autocast = (lambda: torch.autocast(device, dtype=dtype)) if dtype else contextlib.nullcontext
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self.times = {axes: 0.0 for axes in self.flips}

    def __call__(self, x):
        import torch

        sums = {level: None for level in self.levels}
        with torch.no_grad():
            for axes in self.flips:
                start = time.perf_counter()
                with self.autocast():
                    probs = self.inner.probabilities(torch.flip(x, axes) if axes else x)
                probs = self.inner.crop(torch.flip(probs, axes) if axes else probs)
                self.sync()
                self.times[axes] += time.perf_counter() - start
                for level in self.levels:
                    if axes in self.members[level]:
                        sums[level] = probs.clone() if sums[level] is None else sums[level].add_(probs)
        return torch.cat([sums[level] / len(self.members[level]) for level in self.levels], 1)

    def level_seconds(self, level: int) -> float:
        return sum(self.times[axes] for axes in self.members[level])


def labels_for(model, image, task, levels, overlap: float, precision: str, device: str = "cpu") -> tuple[dict, dict]:
    """{level: (x, y, z) uint8 labels on the input grid}, {level: network seconds} for one sliding-window pass."""
    import torch
    from monai.inferers import SlidingWindowInferer

    from uniseg_hub import postprocess

    predictor = LevelsPredictor(model, task, levels, precision, device)
    inferer = SlidingWindowInferer(roi_size=model.patch_size, sw_batch_size=1, overlap=overlap, mode="gaussian",
                                   sigma_scale=0.125, padding_mode="constant", cval=0.0)
    with torch.no_grad():
        probs = inferer(image.as_tensor()[None].to(device), predictor)[0]
    k = task.num_classes
    out = {}
    for i, level in enumerate(predictor.levels):
        back = postprocess(probs[i * k: (i + 1) * k], image)
        out[level] = back.as_tensor().argmax(0).to(torch.uint8).cpu().numpy()
    return out, {level: predictor.level_seconds(level) for level in predictor.levels}


def windows(image, model, overlap: float) -> list:
    """The sliding window's patch positions for this image and overlap (as MONAI's inferer computes them)."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    size = [max(n, p) for n, p in zip(image.shape[1:], model.patch_size)]
    interval = _get_scan_interval(size, model.patch_size, len(size), (overlap,) * len(size))
    return [tuple((s.start, s.stop) for s in box) for box in dense_patch_slices(size, model.patch_size, interval)]


def compare(ours, reference, num_classes: int) -> dict:
    """Dice per label present in either map (None: absent from both) and the fraction of equal voxels."""
    import numpy as np

    dice = {}
    for label in range(1, num_classes):
        a, b = ours == label, reference == label
        total = int(a.sum()) + int(b.sum())
        dice[label] = None if total == 0 else 2 * int(np.logical_and(a, b).sum()) / total
    return {"dice": dice, "voxel_agreement": float((ours == reference).mean()),
            "voxels_per_label": {label: int((reference == label).sum()) for label in range(num_classes)}}


def run(args) -> dict:
    import torch

    from uniseg_hub import load_model, preprocess
    from uniseg_hub.app.sample_data import fetch_sample
    from uniseg_hub.cpu import native_bf16
    from uniseg_hub.cpu.precision import bf16_flags
    from uniseg_hub.tasks import get_task

    if args.weights:
        weights, seeded = args.weights, False
    else:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from run import full_size_checkpoint

        _, weights = full_size_checkpoint(Path(args.workdir))
        seeded = True
    device = args.device
    model = load_model(str(weights), device=device)
    task = get_task(args.task)
    levels = [int(v) for v in args.levels.split(",")]
    overlaps = [float(v) for v in args.overlaps.split(",")]
    precisions = [p for p in args.precisions.split(",") if p]
    result = {"weights": "seeded random weights in the official format (official ones unreachable)" if seeded
              else str(weights), "task": task.name, "labels": task.label_names, "cpu_bf16_flags": bf16_flags(),
              "native_bf16": native_bf16(), "threads": torch.get_num_threads(), "device": device,
              "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None, "scans": {}}
    for name in args.scans.split(","):
        image = preprocess(fetch_sample(name), task.name)
        log(f"{name}: preprocessed {tuple(image.shape)}")
        runs, same_windows = {}, {}
        for overlap in overlaps:
            if overlap != overlaps[0] and windows(image, model, overlap) == windows(image, model, overlaps[0]):
                same_windows[overlap] = overlaps[0]  # the same windows and weights: the same computation
                runs[("fp32", overlap)] = runs[("fp32", overlaps[0])]
                log(f"  fp32, overlap {overlap}: the same windows as overlap {overlaps[0]} on this scan")
                continue
            log(f"  fp32, overlap {overlap}, levels {levels} ...")
            runs[("fp32", overlap)] = labels_for(model, image, task, levels, overlap, "fp32", device)
        for precision in precisions:
            plevels = [int(v) for v in args.precision_levels.split(",")]
            log(f"  {precision}, overlap 0.5, levels {plevels} ...")
            runs[(precision, 0.5)] = labels_for(model, image, task, plevels, 0.5, precision, device)
        official = runs[("fp32", overlaps[0])][0][max(levels)]
        rows = []
        for (precision, overlap), (maps, seconds) in runs.items():
            for level, labels in maps.items():
                row = {"precision": precision, "overlap": overlap, "tta": level, "network_s": seconds[level],
                       "vs_official": compare(labels, official, task.num_classes)}
                same = runs.get(("fp32", overlap), ({}, {}))[0].get(level)
                if precision != "fp32" and same is not None:  # the precision alone: against fp32 at that level
                    row["vs_fp32_same_settings"] = compare(labels, same, task.num_classes)
                if overlap in same_windows:
                    row["same_windows_as"] = same_windows[overlap]
                rows.append(row)
        result["scans"][name] = {"shape": list(image.shape[1:]), "rows": rows,
                                 "windows": {str(o): len(windows(image, model, o)) for o in overlaps}}
    return result


def min_dice(comparison: dict) -> float | None:
    values = [d for d in comparison["dice"].values() if d is not None]
    return min(values) if values else None


def table(result: dict) -> str:
    where = result.get("gpu") or f"CPU (bf16 flags: {', '.join(result['cpu_bf16_flags']) or 'none'})"
    lines = [f"agreement with 8 flips, overlap 0.5, float32, task {result['task']}, on {where}; weights: "
             f"{result['weights']}"]
    for name, scan in result["scans"].items():
        names = result["labels"]
        labels = [names[k] for k in sorted(names, key=int)][1:]  # a dict {label: name} (JSON: string keys)
        counts = ", ".join(f"{n} windows at overlap {o}" for o, n in scan["windows"].items())
        lines.append(f"{name} (network grid {'x'.join(map(str, scan['shape']))}; {counts}):")
        head = f"  {'precision':<9} {'overlap':>7} {'tta':>3} {'net s':>7}  " + "  ".join(
            f"Dice {n[:10]:<10}" for n in labels) + "  voxels equal  (precision alone: Dice / voxels vs fp32)"
        lines.append(head)
        for row in scan["rows"]:
            c = row["vs_official"]
            dice = "  ".join(f"{'-' if d is None else f'{d:.4f}':<15}" for d in c["dice"].values())
            extra = ""
            if "vs_fp32_same_settings" in row:
                p = row["vs_fp32_same_settings"]
                low = min_dice(p)
                extra = f"  {'-' if low is None else f'{low:.4f}'} / {100 * p['voxel_agreement']:.3f} %"
            if "same_windows_as" in row:
                extra += f"  (the windows of overlap {row['same_windows_as']}: identical)"
            lines.append(f"  {row['precision']:<9} {row['overlap']:>7} {row['tta']:>3} {row['network_s']:>7.1f}  "
                         f"{dice}  {100 * c['voxel_agreement']:>10.3f} %{extra}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scans", default=",".join(SCANS), help="sample names (uniseg_hub.app.sample_data.SAMPLES)")
    p.add_argument("--task", default="liver")
    p.add_argument("--levels", default="8,4,2,1", help="TTA levels (one pass of the largest gives all)")
    p.add_argument("--overlaps", default="0.5,0.25,0", help="sliding-window overlaps (0.5 first: the official)")
    p.add_argument("--precisions", default="bf16", help="non-default precisions to compare (CPU: bf16)")
    p.add_argument("--precision-levels", default="1", help="TTA levels of the precision runs (fp32 has them all)")
    p.add_argument("--weights", default=None, help="real weights (a converted folder); default: seeded random")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the network runs (fp32 there is the "
                   "reference; on CUDA compare --precisions fp16,bf16)")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "uniseg-hub-bench"))
    p.add_argument("--json", default=None, help="also write the result as JSON here")
    p.add_argument("--from-json", default=None, help="print the table of a result written by --json, run nothing")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.from_json:
        print(table(json.loads(Path(args.from_json).read_text())))
        return 0
    result = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
