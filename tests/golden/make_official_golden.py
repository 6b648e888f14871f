"""Produce ``tests/networks/data/official_golden.json`` by running the OFFICIAL UniSeg network classes.

This script is ours; it only *imports* the official classes from a checkout of
github.com/yeerwen/UniSeg that lives OUTSIDE this project. The official code needs
``batchgenerators`` and ``scipy`` (for its package imports), so run it from a
scratch environment, never from the project's own venv::

    UNISEG_OFFICIAL_ROOT=/path/to/UniSeg  \\
        /path/to/scratch-venv/bin/python tests/golden/make_official_golden.py \\
        --official-commit <sha of that checkout> --out tests/networks/data/official_golden.json

``UNISEG_OFFICIAL_ROOT`` (or ``--official-root``) is the folder that holds the
official ``Upstream/`` and ``Downstream/`` folders. Both contain a package called
``nnunet``, so each part runs in its own subprocess (``--part upstream`` /
``--part downstream``) with only that folder on ``sys.path``.

For every case the official model is built exactly as the official trainers do
(``UniSeg_Trainer.initialize_network`` / ``UniSeg_Trainer_DS.initialize_network``;
small cases only add ``max_num_features`` and a smaller ``base_num_features`` /
patch), its state-dict keys, order and shapes are asserted equal to
``tests/official_format.official_shapes``, ``seeded_state_dict`` is loaded
(strict), and the model is run under ``torch.no_grad()`` in float32 with
``torch.set_num_threads(2)``:

* ``eval``: ``net.eval(); net.do_ds = False`` -> full-resolution logits;
* ``ds``:   ``net.train(); net.do_ds = True``  -> 5 deep-supervision outputs,
  full resolution first.

Every output is summarised (shape, per-channel float64 sums, float64 sum of
absolute values, values at ``sample_indices(numel, 512, sample_seed)`` of the
flattened tensor). Axis order everywhere is the official (z, y, x): inputs are
(B, C, z, y, x).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/ -> official_format
import official_format as of  # noqa: E402

NUM_SAMPLES = 512
SAMPLE_SEED = 12345
THREADS = 2

FULL = dict(base_features=32, max_features=320, num_tasks=11, num_classes=4, patch_zyx=(64, 192, 192))
SMALL = dict(base_features=4, max_features=16, num_tasks=11, num_classes=4, patch_zyx=(32, 64, 64))
DOWN_SMALL = dict(base_features=4, max_features=16, downstream_classes=14)

# name, config, weight_seed, in_channels, task_ids (one per sample), batch, input_seed, with_ds
# up_small_c1_t7 reuses the input of up_small_c1_t0 (only the task differs); up_small_c1_t7_mixed
# shows that the official forward uses task_id[0] for the whole batch (equals up_small_c1_t7).
UPSTREAM_CASES = [
    ("up_small_c1_t0", "SMALL", 2000, 1, 0, 2, 2101, True),
    ("up_small_c1_t7", "SMALL", 2000, 1, 7, 2, 2101, True),
    ("up_small_c1_t7_mixed", "SMALL", 2000, 1, [7, 0], 2, 2101, False),
    ("up_small_c2_t10", "SMALL", 2000, 2, 10, 2, 2103, True),
    ("up_small_c4_t9", "SMALL", 2000, 4, 9, 2, 2104, True),
    ("up_full_c1_t0", "FULL", 1000, 1, 0, 1, 1101, False),
    ("up_full_c4_t9", "FULL", 1000, 4, 9, 1, 1102, False),
    ("up_full_c2_t10", "FULL", 1000, 2, 10, 1, 1103, False),
]
DOWNSTREAM_CASES = [
    ("down_small_c1_k14", "DOWN_SMALL", 3000, 1, None, 2, 3101, True),
]
CONFIGS = {"FULL": FULL, "SMALL": SMALL, "DOWN_SMALL": DOWN_SMALL}
INPUT_ZYX = {"FULL": (64, 192, 192), "SMALL": (32, 64, 64), "DOWN_SMALL": (32, 64, 64)}

POOL = [list(p) for p in of.POOL_KERNELS]
CONV = [list(k) for k in of.CONV_KERNELS]


def _trainer_args(num_classes, base):
    """Positional arguments after (patch_size,) exactly as the official trainers pass them."""
    from nnunet.network_architecture.initialization import InitWeights_He

    return (
        11, [1, 2, 4], base, num_classes, len(POOL), 2, 2,
        nn.Conv3d, nn.InstanceNorm3d, {"eps": 1e-5, "affine": True},
        nn.Dropout3d, {"p": 0, "inplace": True},
        nn.LeakyReLU, {"negative_slope": 1e-2, "inplace": True},
        True, False, lambda x: x, InitWeights_He(1e-2), POOL, CONV, False, True, True,
    )


def build_upstream(cfg):
    from nnunet.network_architecture.Prompt_generic_UNet import UniSeg_model

    assert cfg["num_tasks"] == 11  # the trainer hard-codes 11 tasks and [1, 2, 4] stems
    kw = {} if cfg["max_features"] == 320 else {"max_num_features": cfg["max_features"]}
    return UniSeg_model(list(cfg["patch_zyx"]), *_trainer_args(cfg["num_classes"], cfg["base_features"]), **kw)


def build_downstream(cfg):
    from nnunet.network_architecture.PromptNet import UniSeg_Backbone

    kw = {} if cfg["max_features"] == 320 else {"max_num_features": cfg["max_features"]}
    return UniSeg_Backbone(None, *_trainer_args(cfg["downstream_classes"], cfg["base_features"]), **kw)


def check_shapes(net, cfg):
    got = [(k, tuple(v.shape)) for k, v in net.state_dict().items()]
    want = [(k, tuple(v)) for k, v in of.official_shapes(**cfg).items()]
    assert got == want, f"official_shapes mismatch: {set(got) ^ set(want)}"
    return {"tensors": len(got), "params": int(sum(p.numel() for p in net.parameters()))}


def summarize(t: torch.Tensor, sample_seed=SAMPLE_SEED):
    t = t.detach().float().contiguous()
    d = t.double()
    idx = of.sample_indices(t.numel(), NUM_SAMPLES, sample_seed)
    return {
        "shape": list(t.shape),
        "channel_sums": d.sum(dim=[i for i in range(t.dim()) if i != 1]).tolist(),
        "abs_sum": d.abs().sum().item(),
        "max_abs": d.abs().max().item(),
        "sample_seed": sample_seed,
        "sample_indices": idx.tolist(),
        # shortest decimal that round-trips the float32 value
        "sample_values": [float(str(v)) for v in t.reshape(-1)[idx].numpy()],
    }


def fingerprint_sd(sd):
    return {
        "num_tensors": len(sd),
        "numel": int(sum(v.numel() for v in sd.values())),
        "sum": float(sum(v.double().sum().item() for v in sd.values())),
        "abs_sum": float(sum(v.double().abs().sum().item() for v in sd.values())),
        "per_key_sum": {k: v.double().sum().item() for k, v in sd.items()},
    }


def run_cases(cases, builder, upstream):
    out, nets, fps = [], {}, {}
    for name, cfg_name, wseed, cin, task, batch, iseed, with_ds in cases:
        if cfg_name == "FULL" and os.environ.get("GOLDEN_SKIP_FULL"):
            continue
        cfg = CONFIGS[cfg_name]
        key = (cfg_name, wseed)
        if key not in nets:
            torch.manual_seed(0)  # official ctor draws the prompt / He init from the global RNG
            net = builder(cfg)
            counts = check_shapes(net, cfg)
            sd = of.seeded_state_dict(of.official_shapes(**cfg), wseed)
            net.load_state_dict(sd, strict=True)
            nets[key] = net
            fps[f"{cfg_name}@{wseed}"] = dict(fingerprint_sd(sd), **counts)
        net = nets[key]
        x = of.seeded_input((batch, cin, *INPUT_ZYX[cfg_name]), iseed)
        task_ids = None if task is None else (list(task) if isinstance(task, list) else [task] * batch)
        args = (x,) if task_ids is None else (x, torch.tensor(task_ids, dtype=torch.long))
        rec = {
            "name": name,
            "network": "UniSeg_model" if upstream else "UniSeg_Backbone",
            "config": cfg_name,
            "shape_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
            "weight_seed": wseed,
            "input_shape": list(x.shape),
            "input_seed": iseed,
            "input_sum": x.double().sum().item(),
            "task_id": task_ids,
        }
        t0 = time.time()
        with torch.no_grad():
            net.eval()
            net.do_ds = False
            y = net(*args)
            rec["eval"] = summarize(y)
            if with_ds:
                net.train()
                net.do_ds = True
                ys = net(*args)
                assert isinstance(ys, (list, tuple)) and len(ys) == 5
                rec["ds"] = [summarize(o) for o in ys]
                rec["ds0_minus_eval_max_abs"] = (ys[0] - y).abs().max().item()
        print(f"[{name}] {time.time() - t0:.1f} s, eval shape {list(y.shape)}", file=sys.stderr, flush=True)
        out.append(rec)
    return out, fps


def part_upstream():
    cases, fps = run_cases(UPSTREAM_CASES, build_upstream, True)
    cfg = FULL
    counts = {"upstream_full": check_shapes(build_upstream(cfg), cfg)["params"]}
    return {"cases": cases, "weights": fps, "param_counts": counts}


def part_downstream():
    cases, fps = run_cases(DOWNSTREAM_CASES, build_downstream, False)
    counts = {}
    for n in (14, 2):
        cfg = dict(base_features=32, max_features=320, downstream_classes=n)
        net = build_downstream(cfg)
        counts[f"downstream_full_{n}"] = check_shapes(net, cfg)["params"]
    return {"cases": cases, "weights": fps, "param_counts": counts}


def _compact(obj) -> str:
    """Indented JSON with lists of numbers kept on one line."""
    s = json.dumps(obj, indent=1)
    return re.sub(r"\[\s*([-0-9.eE+,\s]*?)\s*\]", lambda m: "[" + re.sub(r"\s+", "", m.group(1)) + "]", s)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official-root", default=os.environ.get("UNISEG_OFFICIAL_ROOT"))
    ap.add_argument("--official-commit", default="unknown")
    ap.add_argument("--out", default=str(HERE.parent / "networks" / "data" / "official_golden.json"))
    ap.add_argument("--part", choices=["all", "upstream", "downstream"], default="all")
    a = ap.parse_args()
    if not a.official_root:
        ap.error("set --official-root or UNISEG_OFFICIAL_ROOT")
    torch.set_num_threads(THREADS)

    if a.part != "all":
        sys.path.insert(0, str(Path(a.official_root) / ("Upstream" if a.part == "upstream" else "Downstream")))
        res = part_upstream() if a.part == "upstream" else part_downstream()
        res["torch"] = torch.__version__
        Path(a.out).write_text(json.dumps(res))
        return

    merged = {
        "meta": {
            "official_repo": "github.com/yeerwen/UniSeg",
            "official_commit": a.official_commit,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "threads": THREADS,
            "dtype": "float32",
            "axis_order": "official nnU-Net (z, y, x); inputs (B, C, z, y, x)",
            "num_samples": NUM_SAMPLES,
            "configs": {k: {kk: list(vv) if isinstance(vv, tuple) else vv for kk, vv in v.items()}
                        for k, v in CONFIGS.items()},
            "input_zyx": {k: list(v) for k, v in INPUT_ZYX.items()},
            "notes": "eval = net.eval(), do_ds=False; ds = net.train(), do_ds=True (full res first). "
                     "Weights: official_format.seeded_state_dict(official_shapes(**config), weight_seed); "
                     "input: official_format.seeded_input(input_shape, input_seed); "
                     "samples: flat indices official_format.sample_indices(numel, 512, sample_seed).",
        },
        "param_counts": {},
        "weights": {},
        "cases": [],
    }
    for part in ("upstream", "downstream"):
        with tempfile.TemporaryDirectory() as td:
            tmp = Path(td) / f"{part}.json"
            cmd = [sys.executable, __file__, "--part", part, "--official-root", a.official_root, "--out", str(tmp)]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            res = json.loads(tmp.read_text())
        assert res.pop("torch") == torch.__version__
        merged["param_counts"].update(res["param_counts"])
        merged["weights"].update(res["weights"])
        merged["cases"] += res["cases"]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(_compact(merged) + "\n")
    print(f"wrote {a.out}: {merged['param_counts']}", file=sys.stderr)


if __name__ == "__main__":
    main()
