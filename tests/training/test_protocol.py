"""The fine-tuning protocol reports numbers the way the official one does (issue 14): the final checkpoint, scored
with 8-flip mirroring; model selection only on a validation split carved from the training cases; samples per
epoch independent of the number of ranks; a class absent from prediction and reference left out of the mean."""

import json
import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from monai.metrics import DiceMetric
from test_training import btcv_small, workflow  # noqa: F401  (btcv_small is a fixture)

from uniseg_hub import UniSegBackbone
from uniseg_hub.errors import TrainingError
from uniseg_hub.pipeline import BackbonePredictor, MirroredPredictor, TaskPredictor
from uniseg_hub.tasks import get_task
from uniseg_hub.training import (
    AbsentClassDiceMetric,
    carve_validation,
    checkpoint_provenance,
    dice_metric,
    distributed,
    iterations_per_rank,
    load_datalist,
)

SMALL = dict(features=[4, 8, 16, 16, 16, 16])
PATCH = (64, 32, 16)
ALL_FLIPS = {(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)}


# (a) one mirroring code for the universal model and the fine-tuned backbone


def test_backbone_predictor_mirrors_8_flips_like_the_task_predictor():
    torch.manual_seed(0)
    model = UniSegBackbone(3, **SMALL).eval()
    x = torch.randn(1, 1, *PATCH)
    mirrored, plain = BackbonePredictor(model), BackbonePredictor(model, mirror=False)
    assert set(mirrored.flips) == ALL_FLIPS and len(mirrored.flips) == 8 and plain.flips == [()]
    with torch.no_grad():
        by_hand = sum(torch.flip(model(torch.flip(x, a)).softmax(1), a) for a in ALL_FLIPS) / 8
        single = model(x).softmax(1)
    out = mirrored(x)
    torch.testing.assert_close(out, by_hand, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(plain(x), single, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out, single, atol=1e-4)  # the flips change the result: mirroring really ran

    # the same flips and the same averaging code serve the universal model (inference.json) and the backbone
    liver = [get_task("liver")]
    task = TaskPredictor(torch.nn.Identity(), liver, cpu_fast_path=False)
    assert task.flips == mirrored.flips
    assert TaskPredictor(torch.nn.Identity(), liver, mirror=False, cpu_fast_path=False).flips == [()]
    for cls in (TaskPredictor, BackbonePredictor):
        assert issubclass(cls, MirroredPredictor) and "forward" not in cls.__dict__


# (d) the downstream Dice: nnU-Net's evaluator, MONAI's as options


def one_hot(labels, classes=3):
    """(B, classes, 4, 4, 4) one-hot maps, each case a list of (class, number of voxels) filled in order."""
    out = torch.zeros(len(labels), classes, 4 * 4 * 4)
    for b, case in enumerate(labels):
        flat = torch.zeros(4 * 4 * 4, dtype=torch.long)
        start = 0
        for value, count in case:
            flat[start: start + count] = value
            start += count
        out[b] = torch.nn.functional.one_hot(flat, classes).T.float()
    return out.reshape(len(labels), classes, 4, 4, 4)


def test_a_class_absent_from_prediction_and_reference_is_left_out_of_the_mean():
    # case 0: class 1 perfect, class 2 absent from both; case 1: class 1 half right, class 2 predicted, not there
    pred = one_hot([[(1, 8)], [(1, 8), (2, 4)]])
    label = one_hot([[(1, 8)], [(0, 4), (1, 8)]])
    metric = dice_metric("exclude")
    assert isinstance(metric, AbsentClassDiceMetric)
    metric(pred, label)
    scores = metric.get_buffer()
    assert scores[0, 0] == 1.0 and math.isnan(scores[0, 1])
    assert scores[1, 0] == pytest.approx(2 * 4 / 16) and scores[1, 1] == 0.0
    # nnU-Net's summary: each class over the cases where it is defined, then over classes
    assert float(metric.aggregate()) == pytest.approx(((1.0 + 0.5) / 2 + 0.0) / 2)

    counted = dice_metric("one")  # UniSeg's upstream evaluation: absent from both counts 1
    counted(pred, label)
    assert counted.get_buffer()[0, 1] == 1.0 and float(counted.aggregate()) == pytest.approx((1 + 1 + 0.5 + 0) / 4)
    monai_default = dice_metric("monai")  # MONAI's DiceMetric(): an empty reference is left out
    assert type(monai_default) is DiceMetric and monai_default.ignore_empty
    monai_default(pred, label)
    assert math.isnan(monai_default.get_buffer()[1, 1])
    with pytest.raises(TrainingError, match="exclude, one, monai"):
        dice_metric("zero")

    indices = AbsentClassDiceMetric(num_classes=3)  # class-index inputs give the same scores
    indices(pred.argmax(1, keepdim=True), label.argmax(1, keepdim=True))
    torch.testing.assert_close(indices.get_buffer(), scores, equal_nan=True)


# (b) selection only on cases carved from the training list


def test_the_validation_split_is_carved_from_the_training_cases_deterministically():
    cases = [{"image": f"img{i:04d}.nii.gz"} for i in range(21)]
    train, val = carve_validation(cases, 0.2, seed=7)
    assert len(val) == 4 and len(train) == 17 and sorted(map(str, train + val)) == sorted(map(str, cases))
    assert (train, val) == carve_validation(cases, 0.2, seed=7)
    assert val != carve_validation(cases, 0.2, seed=8)[1]
    assert carve_validation(cases, 0.0) == (cases, [])
    assert len(carve_validation(cases[:2], 0.1)[1]) == 1  # at least one case when a split is asked for
    for bad in (1.0, -0.1, "0.2", True):
        with pytest.raises(TrainingError, match=r"\[0, 1\)"):
            carve_validation(cases, bad)
    with pytest.raises(TrainingError, match="leaves none to train on"):
        carve_validation(cases[:1], 0.5)


def test_by_default_nothing_is_selected_and_the_final_checkpoint_is_evaluated_with_mirroring(
        btcv_small, converted_small, tmp_path):  # noqa: F811
    wf = workflow(tmp_path, btcv_small, converted_small, config_defaults=("validation_fraction",))
    get = wf.parser.get_parsed_content
    test_cases = {c["image"] for c in load_datalist(btcv_small / "datalist.json", "validation")}
    assert get("validation_fraction") == 0 and get("select_best") is False
    assert get("weights").endswith("/last") and get("tta") == 8 and get("dice_empty") == "exclude"
    assert get("eval_split") == "validation" and {c["image"] for c in get("evaluation#data")} == test_cases
    assert get("validate#data") == [] and len(get("train#data")) == 2
    # the official window and resampling score the test cases, as inference.json runs them
    assert wf.parser["evaluation"]["evaluator"]["inferer"].replace("::", "#") == "@validate#inferer"
    assert type(get("validate#inferer")).__name__ == "NnUNetSlidingWindowInferer"
    assert "ResampleToSpacingd" in [type(t).__name__ for t in get("evaluation#preprocessing").transforms]
    assert "Spacingd" not in [type(t).__name__ for t in get("evaluation#preprocessing").transforms]
    assert not test_cases & {c["image"] for c in get("train#data")}
    handlers = [type(h).__name__ for h in get("train#handlers")]
    assert "ValidationHandler" not in handlers and "TrainingCheckpoint" in handlers
    assert get("train#trainer").state.epoch_length == get("iterations_per_epoch")
    network = wf.parser.config["evaluation"]["network"]
    assert network["_target_"] == "uniseg_hub.pipeline.BackbonePredictor" and network["mirror"] == "@tta"
    assert all(t["_target_"] != "Activationsd" for t in wf.parser.config["evaluation"]["postprocessing"]["transforms"])

    carved = workflow(tmp_path / "carved", btcv_small, converted_small, validation_fraction=0.5)
    get = carved.parser.get_parsed_content
    training = {c["image"] for c in load_datalist(btcv_small / "datalist.json", "training")}
    validation = {c["image"] for c in get("validate#data")}
    assert len(validation) == 1 and validation < training and not validation & test_cases
    assert not validation & {c["image"] for c in get("train#data")}
    assert "ValidationHandler" in [type(h).__name__ for h in get("train#handlers")]


# (c) samples per epoch do not depend on the number of ranks


def test_iterations_per_epoch_are_split_over_the_ranks(monkeypatch):
    batch = 2
    for world in (1, 2, 3, 8):
        monkeypatch.setattr(distributed, "world_size", lambda w=world: w)
        per_rank = iterations_per_rank(250)
        samples = per_rank * world * batch
        assert 500 <= samples < 500 + world * batch, (world, per_rank)
    with pytest.raises(TrainingError, match="positive whole number"):
        iterations_per_rank(0)


def _rank(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
            json.dump({"iterations": iterations_per_rank(5), "world": distributed.world_size()}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_share_the_iterations_of_an_epoch(tmp_path):
    init = tempfile.NamedTemporaryFile(dir=tmp_path, delete=False).name
    os.remove(init)
    mp.spawn(_rank, args=(init, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert ranks == [{"iterations": 3, "world": 2}] * 2


# (e) the report says which checkpoint and which inference settings produced it


@pytest.mark.slow
def test_a_run_reports_the_final_checkpoint_with_mirroring_and_selects_on_carved_cases(
        btcv_small, converted_small, tmp_path):  # noqa: F811
    settings = dict(epochs=2, iterations_per_epoch=1, validation_fraction=0.5, val_interval=1)
    workflow(tmp_path, btcv_small, converted_small, **settings).run()
    ckpt = tmp_path / "models" / "finetuned"
    assert sorted(p.name for p in ckpt.iterdir()) == ["best", "last"]
    last, best = checkpoint_provenance(ckpt / "last"), checkpoint_provenance(ckpt / "best")
    assert last["final"] is True and last["epoch"] == last["max_epochs"] == 2
    assert "carved from the training cases" in best["selected_by"] and "val_mean_dice" in best["selection_metric"]

    reports = {}
    for tta in (True, False, 4):  # a switch, as before, or a level of predict's --tta 8|4|2|1
        out = tmp_path / f"eval_tta_{tta}"
        workflow(tmp_path, btcv_small, converted_small, run_id="evaluate", output_dir=str(out), tta=tta,
                 **settings).run()
        reports[tta] = json.loads((out / "summary.json").read_text())
        report = json.loads((out / "report.json").read_text())  # the one report, as `uniseg-hub evaluate` writes
        assert report["mean"]["dice"] == pytest.approx(reports[tta]["mean"], abs=1e-5)
        assert report["settings"]["mirror_flips"] == {True: 8, False: 1, 4: 4}[tta] and "esophagus" in report["labels"]
        assert (out / "report_boxplot.png").is_file() and (out / "report.csv").is_file()
    evaluated = reports[True]["evaluated_with"]
    assert evaluated["weights"] == str(ckpt / "last") and evaluated["final"] is True
    assert evaluated["tta"] is True and evaluated["mirror_flips"] == 8 and evaluated["dice_empty"] == "exclude"
    assert reports[False]["evaluated_with"]["mirror_flips"] == 1 and reports[False]["evaluated_with"]["tta"] is False
    assert reports[4]["evaluated_with"]["mirror_flips"] == 4 and reports[4]["evaluated_with"]["tta"] is True
    assert reports[True]["cases"] == 1
    # esophagus is absent from the reference: left out (None) unless predicted (then 0), never counted as 1
    assert reports[True]["per_class"]["esophagus"] in (None, 0.0)
    defined = [v for v in reports[True]["per_class"].values() if v is not None]
    assert reports[True]["mean"] == pytest.approx(sum(defined) / len(defined), abs=1e-6)
