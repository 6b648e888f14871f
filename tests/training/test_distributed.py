"""Distributed data-parallel fine-tuning and sharded evaluation under torchrun, two gloo ranks on CPU.

This file is also the per-rank driver that torchrun starts: it runs train.json + btcv.json + multi_gpu_train.json
through MONAI's ConfigWorkflow, then all-gathers every rank's parameters.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_training import CONFIGS, SMALL_RUN, workflow, write_btcv_tree

from uniseg_hub.app.prepare import prepare_btcv

pytestmark = pytest.mark.slow  # two torchrun processes train and evaluate

MULTI = ["train.json", "btcv.json", "multi_gpu_train.json"]
TIMEOUT = 420


@pytest.fixture(scope="module")
def btcv_uneven(tmp_path_factory):
    """Two training cases and three validation cases (so two ranks get 2 and 1): the real CT, plain or mirrored."""
    raw = write_btcv_tree(tmp_path_factory.mktemp("raw"), {1: False, 2: True, 32: False, 33: True, 34: False})
    out = tmp_path_factory.mktemp("prepared")
    prepare_btcv(raw, out)
    return out


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parent), str(Path(__file__).parents[1]), str(Path(__file__).parents[2]),
         os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    return result


def per_case(csv_path: Path) -> dict[str, list[float]]:
    with open(csv_path) as f:
        return {Path(r["filename"]).name: [float(v) for k, v in r.items() if k.startswith("class")]
                for r in csv.DictReader(f)}


def test_two_gloo_ranks_train_in_step_and_gather_the_single_process_metric(btcv_uneven, converted_small, tmp_path):
    root = tmp_path / "bundle"
    # all training cases train (no carved validation); the epoch's 2 iterations are shared: one per rank
    settings = {**SMALL_RUN, "epochs": 1, "iterations_per_epoch": 2, "validation_fraction": 0, "bundle_root": str(root),
                "dataset_dir": str(btcv_uneven), "pretrained": str(converted_small)}
    torchrun(__file__, json.dumps(settings), str(tmp_path), cwd=tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["identical"] for r in ranks), "ranks hold different parameters after training"
    assert all(r["changed"] for r in ranks) and ranks[0]["digest"] == ranks[1]["digest"]
    assert [r["iteration"] for r in ranks] == [1, 1] and [r["world"] for r in ranks] == [2, 2]
    assert (root / "models" / "finetuned" / "last" / "model.safetensors").is_file()
    assert not (root / "models" / "finetuned" / "best").exists()  # nothing selected: no split carved

    # sharded evaluation with the bundle command itself, then the same evaluation in one process
    overrides = [f"--{k}={json.dumps(v)}" for k, v in settings.items() if k not in ("bundle_root", "dataset_dir")]
    configs = "[" + ",".join(f"'{CONFIGS / c}'" for c in MULTI) + "]"
    torchrun("-m", "monai.bundle", "run", "evaluate", "--config_file", configs, f"--bundle_root={root}",
             f"--dataset_dir={btcv_uneven}", f"--output_dir={tmp_path / 'sharded'}", *overrides, cwd=tmp_path)
    single = workflow(root, btcv_uneven, converted_small, run_id="evaluate", output_dir=str(tmp_path / "single"))
    single.run()

    sharded_summary, single_summary = (json.loads((tmp_path / d / "summary.json").read_text())
                                       for d in ("sharded", "single"))
    assert sharded_summary["cases"] == single_summary["cases"] == 3
    assert sharded_summary["mean"] == pytest.approx(single_summary["mean"], abs=1e-6)
    assert sharded_summary["per_class"] == pytest.approx(single_summary["per_class"], abs=1e-6, nan_ok=True)
    assert sharded_summary["evaluated_with"] == single_summary["evaluated_with"]
    sharded, alone = (per_case(tmp_path / d / "eval_mean_dice_raw.csv") for d in ("sharded", "single"))
    assert sorted(sharded) == sorted(alone) == ["img0032.nii.gz", "img0033.nii.gz", "img0034.nii.gz"]
    assert all(sharded[k] == pytest.approx(alone[k], abs=1e-6, nan_ok=True) for k in alone)
    # the evaluation report gathers every rank's cases: the same rows as one process
    reports = [json.loads((tmp_path / d / "report.json").read_text()) for d in ("sharded", "single")]
    assert reports[0]["cases"] == reports[1]["cases"] == 3
    assert [(r["case"], r["name"]) for r in reports[0]["rows"]] == [(r["case"], r["name"]) for r in reports[1]["rows"]]
    assert [r["dice"] for r in reports[0]["rows"]] == pytest.approx([r["dice"] for r in reports[1]["rows"]], abs=1e-6)


def main(settings: str, out_dir: str) -> None:
    """One rank: train with the multi-GPU configuration, then compare parameters across ranks."""
    import torch.distributed as dist
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=[str(CONFIGS / c) for c in MULTI], meta_file=str(CONFIGS / "metadata.json"),
                        logging_file=False, workflow_type="train", **json.loads(settings))
    wf.initialize()
    network = wf.parser.get_parsed_content("network")
    assert isinstance(network, torch.nn.parallel.DistributedDataParallel)
    before = torch.cat([p.detach().reshape(-1).clone() for p in network.module.parameters()])
    wf.run()
    after = torch.cat([p.detach().reshape(-1) for p in network.module.parameters()])
    gathered = [torch.zeros_like(after) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, after)
    result = {"identical": all(torch.equal(gathered[0], g) for g in gathered),
              "changed": not torch.equal(before, after), "digest": float(after.double().sum()),
              "world": dist.get_world_size(),
              "iteration": wf.parser.get_parsed_content("train#trainer").state.iteration}
    Path(out_dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    wf.finalize()


if __name__ == "__main__":
    main(*sys.argv[1:])
