"""One evaluation report: ``score_case`` + ``write_report``, used by ``uniseg-hub evaluate``, evaluate.json and
train.json's ``run evaluate``. Small synthetic label maps whose scores are known by hand."""

from __future__ import annotations

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch

from uniseg_hub.app.evaluate import evaluate, guess_task, pairs_from_folders
from uniseg_hub.cli import main
from uniseg_hub.errors import InputError, TrainingError
from uniseg_hub.training.evaluation import SegmentationReport, score_case, summarize, write_report

NAMES = {0: "background", 1: "liver", 2: "liver tumour"}
AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])


def cube(shape=(12, 12, 6), box=(slice(2, 8), slice(2, 8), slice(1, 4)), value=1, into=None):
    out = np.zeros(shape, np.uint8) if into is None else into
    out[box] = value
    return out


def test_scores_by_hand_with_the_official_dice_rule():
    label = cube()
    pred = cube(box=(slice(2, 8), slice(2, 9), slice(1, 4)))  # one column of voxels more: 108 vs 126
    rows = {r["name"]: r for r in score_case("c", pred, label, NAMES, spacing=(1.5, 1.5, 3.0), task="liver")}
    assert set(rows) == {"liver", "liver tumour"}  # by name, background never scored
    assert rows["liver"]["dice"] == pytest.approx(2 * 108 / (108 + 126))
    assert rows["liver"]["hd95"] == pytest.approx(1.5)  # the extra column is one 1.5 mm voxel away
    assert rows["liver"]["nsd"] == pytest.approx(1.0)  # within the 2 mm tolerance everywhere
    assert math.isnan(rows["liver tumour"]["dice"])  # absent from both: left out (official rule)
    assert math.isnan(rows["liver tumour"]["hd95"]) and math.isnan(rows["liver tumour"]["nsd"])
    # a tolerance under the voxel size: the extra column's surface no longer counts
    tight = score_case("c", pred, label, NAMES, (1.5, 1.5, 3.0), nsd_tolerance=0.5)
    assert tight[0]["nsd"] < 1.0
    # the upstream rule counts it 1.0; a tumour predicted where there is none scores 0, and HD95 is undefined
    assert score_case("c", pred, label, NAMES, dice_empty="one")[1]["dice"] == 1.0
    wrong = score_case("c", cube(box=(0, 0, 0), value=2, into=pred.copy()), label, NAMES)[1]
    assert wrong["dice"] == 0.0 and wrong["nsd"] == 0.0 and math.isnan(wrong["hd95"])
    with pytest.raises(TrainingError, match="unknown dice_empty"):
        score_case("c", pred, label, NAMES, dice_empty="ones")


def test_one_hot_input_and_shape_mismatch():
    label = cube()
    one_hot = torch.nn.functional.one_hot(torch.as_tensor(label).long(), 3).permute(3, 0, 1, 2)
    assert score_case("c", one_hot, label[None], NAMES)[0]["dice"] == 1.0
    with pytest.raises(Exception, match="labels must be on the image's grid"):
        score_case("c", label[:-1], label, NAMES)


def test_write_report_json_csv_summary_and_boxplot(tmp_path):
    label = cube(box=(slice(3, 5), slice(3, 5), slice(2, 3)), value=2, into=cube())
    rows = score_case("a", label, label, NAMES, task="liver")
    rows += score_case("b", cube(), label, NAMES, task="liver")  # tumour missed: 0
    report = write_report(rows, tmp_path, NAMES, task="liver", settings={"tta": True})
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["cases"] == 2 and saved["settings"] == {"tta": True} and len(saved["rows"]) == 4
    assert saved["labels"]["liver tumour"]["dice"] == {"mean": 0.5, "std": 0.5, "n": 2}
    assert saved["labels"]["liver"]["dice"]["mean"] < 1.0  # the tumour voxels became liver in case b
    assert saved["mean"]["dice"] == pytest.approx((saved["labels"]["liver"]["dice"]["mean"] + 0.5) / 2, abs=1e-6)
    assert saved["labels"]["liver tumour"]["hd95"]["n"] == 1  # undefined where nothing was predicted
    assert report["files"]["boxplot"] == str(tmp_path / "report_boxplot.png")
    table = list(csv.DictReader((tmp_path / "report.csv").open()))
    assert [(r["case"], r["name"]) for r in table] == [("a", "liver"), ("a", "liver tumour"), ("b", "liver"),
                                                       ("b", "liver tumour")]
    assert table[3]["dice"] == "0.000000" and table[3]["hd95"] == ""
    summary = list(csv.DictReader((tmp_path / "report_summary.csv").open()))
    tumour = next(r for r in summary if r["name"] == "liver tumour" and r["metric"] == "dice")
    assert (tumour["mean"], tumour["std"], tumour["n"]) == ("0.5", "0.5", "2")
    assert [r["metric"] for r in summary if r["name"] == "all"] == ["dice", "hd95", "nsd"]
    png = (tmp_path / "report_boxplot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing temporary left


def test_summary_leaves_undefined_labels_out_of_the_mean():
    rows = [{"case": "a", "task": "", "label": 1, "name": "liver", "dice": 0.8, "hd95": 2.0, "nsd": 0.9},
            {"case": "a", "task": "", "label": 2, "name": "liver tumour", "dice": math.nan, "hd95": math.nan,
             "nsd": math.nan}]
    summary = summarize(rows, NAMES)
    assert summary["mean"] == {"dice": 0.8, "hd95": 2.0, "nsd": 0.9}
    assert summary["labels"]["liver tumour"]["dice"] == {"mean": None, "std": None, "n": 0}


def scans(tmp_path, n=3):
    preds, labels = tmp_path / "pred", tmp_path / "labels"
    preds.mkdir()
    labels.mkdir()
    for i in range(n):
        label = cube(box=(slice(3, 5), slice(3, 5), slice(2, 3)), value=2, into=cube())
        pred = label.copy()
        pred[2:8, 8:8 + i, 1:4] = 1
        nib.save(nib.Nifti1Image(label, AFFINE), labels / f"case{i}.nii.gz")
        nib.save(nib.Nifti1Image(pred, AFFINE), preds / f"case{i}_liver.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((12, 12, 6), np.float32), AFFINE), preds / "case0_liver_probabilities.nii.gz")
    return preds, labels


def test_evaluate_a_predict_folder_matches_cases_and_names_the_task(tmp_path, caplog):
    preds, labels = scans(tmp_path)
    nib.save(nib.Nifti1Image(cube(), AFFINE), labels / "case9.nii.gz")  # no prediction: a warning
    pairs = pairs_from_folders(preds, labels)
    assert [(p.case, p.pred.rsplit("/", 1)[1]) for p in pairs] == [(f"case{i}", f"case{i}_liver.nii.gz")
                                                                   for i in range(3)]
    assert guess_task(pairs) == "liver"
    report = evaluate(preds, labels, out_dir=tmp_path / "out", progress=False)
    assert "1 label(s) without a prediction" in caplog.text
    assert report["task"] == "liver" and report["cases"] == 3
    assert [r["dice"] for r in report["rows"] if r["name"] == "liver"][0] == 1.0
    assert [r["dice"] for r in report["rows"] if r["name"] == "liver"][2] == pytest.approx(2 * 104 / (104 + 140),
                                                                                             abs=1e-6)
    with pytest.raises(InputError, match="already holds a report"):
        evaluate(preds, labels, out_dir=tmp_path / "out", progress=False)


def test_evaluate_a_datalist_gives_the_same_report(tmp_path):
    preds, labels = scans(tmp_path)
    by_folder = evaluate(preds, labels, out_dir=tmp_path / "a", progress=False)
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"testing": [{"pred": f"pred/case{i}_liver.nii.gz",
                                                 "label": f"labels/case{i}.nii.gz"} for i in range(3)]}))
    by_list = evaluate(datalist, task="liver", out_dir=tmp_path / "b", progress=False)
    assert by_list["labels"] == by_folder["labels"] and by_list["rows"] == by_folder["rows"]
    with pytest.raises(InputError, match="give no LABELS folder"):
        evaluate(datalist, labels, out_dir=tmp_path / "c")


def test_evaluate_refuses_what_it_cannot_score(tmp_path):
    preds, labels = scans(tmp_path, n=1)
    with pytest.raises(InputError, match="give the labels folder too"):
        evaluate(preds, out_dir=tmp_path / "o")
    nib.save(nib.Nifti1Image(cube(), np.diag([1.0, 1.0, 1.0, 1.0])), labels / "case0.nii.gz")
    with pytest.raises(InputError, match="not on one grid"):
        evaluate(preds, labels, out_dir=tmp_path / "o", progress=False)
    (labels / "case0.nii.gz").rename(labels / "other.nii.gz")
    with pytest.raises(InputError, match="no prediction in .* matches a label"):
        evaluate(preds, labels, out_dir=tmp_path / "o", progress=False)


def test_without_a_task_labels_are_named_by_value(tmp_path):
    preds, labels = scans(tmp_path, n=1)
    (preds / "case0_liver.nii.gz").rename(preds / "case0.nii.gz")
    report = evaluate(preds, labels, out_dir=tmp_path / "o", progress=False)
    assert list(report["labels"]) == ["label 1", "label 2"] and report["task"] == ""


def test_cli_evaluate_prints_an_aligned_table(tmp_path, capsys):
    preds, labels = scans(tmp_path)
    main(["evaluate", str(preds), str(labels), "--out", str(tmp_path / "r"), "--noprogress"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "liver: 3 case(s), Dice rule exclude"
    header, liver, tumour, mean = out[1:5]
    assert header.split() == ["label", "Dice", "HD95", "mm", "NSD"]
    assert liver.startswith("1 liver ") and tumour.startswith("2 liver tumour ")
    assert mean.startswith("mean over labels")
    assert len({len(line) for line in (header, liver, tumour)}) == 1  # columns aligned
    assert header.index("NSD") + 3 == len(header)
    main(["evaluate", str(preds), str(labels), "--out", str(tmp_path / "r"), "--overwrite", "--json",
          "--dice-empty", "one", "--noprogress"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["settings"]["dice_empty"] == "one" and printed["cases"] == 3
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", str(preds), str(labels), "--dice-empty", "zero"])
    assert exit_.value.code == 2 and "--dice-empty must be one of" in capsys.readouterr().err


def test_the_bundle_handler_writes_the_same_report(tmp_path):
    label = cube()
    handler = SegmentationReport(str(tmp_path), ["background", "liver", "liver tumour"], task="liver")
    handler.rows = handler.score("case0", label, label, (1.5, 1.5, 3.0))

    class State:
        metrics: dict = {}

    class Engine:
        state = State()

    handler.completed(Engine())
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["labels"]["liver"]["dice"]["mean"] == 1.0 and saved["settings"]["dice_empty"] == "exclude"
    assert Engine.state.metrics["report_mean_dice"] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.csv", "report.json", "report_boxplot.png",
                                                          "report_summary.csv"]


def test_fine_tuning_curves_per_label_dice_and_best_epoch(tmp_path):
    from ignite.engine import Engine as IgniteEngine
    from ignite.engine import Events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from uniseg_hub.training import TrainingLog

    trainer = IgniteEngine(lambda engine, batch: {"loss": torch.tensor(1.0 / engine.state.epoch)})
    validator = IgniteEngine(lambda engine, batch: None)
    dice = {1: [[0.2, float("nan")], [0.4, 0.1]], 2: [[0.6, float("nan")], [0.8, float("nan")]],
            3: [[0.5, 0.3], [0.5, 0.3]]}

    @validator.on(Events.EPOCH_COMPLETED)
    def metrics(engine):
        epoch = trainer.state.epoch
        engine.state.epoch = epoch
        engine.state.key_metric_name = "val_mean_dice"
        engine.state.metrics = {"val_mean_dice": float(np.nanmean(np.nanmean(dice[epoch], axis=0)))}
        engine.state.metric_details = {"val_mean_dice": torch.tensor(dice[epoch], dtype=torch.float64)}
        engine.state.best_metric_epoch = 2  # the best mean: 0.2, 0.7, 0.4

    trainer.add_event_handler(Events.STARTED, lambda e: setattr(e.state, "device", torch.device("cpu")))

    @trainer.on(Events.EPOCH_COMPLETED)
    def validate(_):
        validator.state.max_epochs = None  # a fresh run each epoch, as ValidationHandler gives
        validator.run([0], max_epochs=1)

    # attached after the validation, as in train.json
    log = TrainingLog(tmp_path, validator=validator, label_names=["background", "spleen", "liver"])
    log.attach(trainer)
    trainer.run([0, 1], max_epochs=3)
    history = json.loads((tmp_path / "history.json").read_text())
    spleen = history["val_per_label"]["spleen"]
    assert spleen["epoch"] == [1, 2, 3] and spleen["dice"] == pytest.approx([0.3, 0.7, 0.5])
    liver = history["val_per_label"]["liver"]
    assert liver["epoch"] == [1, 2, 3] and liver["dice"][1] is None and liver["dice"][::2] == pytest.approx([0.1, 0.3])
    assert history["best_epoch"] == 2 and history["loss"] == pytest.approx([1.0, 0.5, 1 / 3])
    png = (tmp_path / "training_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    spleen = [(e.step, round(e.value, 4)) for e in events.Scalars("val_dice/spleen")]
    assert spleen == [(1, 0.3), (2, 0.7), (3, 0.5)]
    assert [e.step for e in events.Scalars("val_dice/liver")] == [1, 3]  # undefined at epoch 2: not written


# what the run tells you


def test_version_and_help_are_printed_on_stdout(capsys):
    from uniseg_hub import __version__

    main(["--version"])
    captured = capsys.readouterr()
    assert captured.out == f"uniseg-hub {__version__}\n" and captured.err == ""
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--help"])
    captured = capsys.readouterr()
    assert exit_.value.code == 0
    assert "--nsd-tolerance" in captured.out.replace("_", "-") and "Dice" in captured.out


def test_the_sliding_window_bar_is_labelled_with_its_window_count(capsys):
    from uniseg_hub.pipeline.sliding_window import NnUNetSplitter

    splitter = NnUNetSplitter((8, 8, 4), progress=True)
    windows = list(splitter(torch.zeros(1, 1, 12, 8, 4)))
    err = capsys.readouterr().err
    assert len(windows) == 2 and f"sliding window ({len(windows)} windows)" in err and "2/2" in err


def test_the_volume_table_is_aligned_for_long_names():
    from uniseg_hub.cli import _volume_table

    rows = [{"label": 1, "name": "liver", "voxels": 10, "volume_ml": 1534.25},
            {"label": 12, "name": "a structure with a name longer than twenty-eight characters", "voxels": 3,
             "volume_ml": 2.0}, {"label": 2, "name": "absent", "voxels": 0, "volume_ml": 0.0}]
    lines = _volume_table(rows)
    assert len(lines) == 2 and len({len(line) for line in lines}) == 1  # absent labels left out, columns aligned
    assert lines[0].endswith("1534.2 mL") and lines[1].endswith("   2.0 mL")
    assert lines[0].index("liver") == lines[1].index("a structure")
    assert _volume_table(rows[2:]) == []


def test_all_tasks_maps_are_scored_by_their_merged_label_names(tmp_path):
    from uniseg_hub.tasks import merged_label_names

    preds, labels = scans(tmp_path, n=2)
    for i in range(2):
        (preds / f"case{i}_liver.nii.gz").rename(preds / f"case{i}_all.nii.gz")
        label = cube(box=(slice(9, 11), slice(9, 11), slice(4, 6)), value=11, into=cube())  # liver + spleen
        nib.save(nib.Nifti1Image(label, AFFINE), labels / f"case{i}.nii.gz")
    report = evaluate(preds, labels, out_dir=tmp_path / "o", progress=False)
    merged = merged_label_names()
    assert report["task"] == "all" and list(report["labels"]) == [merged[1], merged[2], merged[11]]
    assert report["labels"][merged[11]]["dice"] == {"mean": 0.0, "std": 0.0, "n": 2}  # spleen missed
