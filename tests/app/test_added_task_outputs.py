"""A model with a task added after training is used like the official one: its task table (config.json) names the
task on the command line, in ``--task all``, the outputs, colours, volume tables, the bundle, info, evaluate and
the model card."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import SMALL_PATCH

from uniseg_hub import ManifestError, UniSeg, UnknownTaskError, cli
from uniseg_hub.app import publish as publishing
from uniseg_hub.app.evaluate import evaluate
from uniseg_hub.config import ManifestEntry, UniSegConfig
from uniseg_hub.palette import PALETTE, TISSUE, colour, segments
from uniseg_hub.pipeline import MergeTasksd, resolve_tasks
from uniseg_hub.pretrained import model_tasks
from uniseg_hub.tasks import OFFICIAL_TASKS, get_task, label_names
from uniseg_hub.weights import save_folder

from scans import crop, sample

KNEE_LABELS = ["femoral cartilage", "tibial cartilage"]
TABLE = OFFICIAL_TASKS.with_task("knee", labels=KNEE_LABELS, channels=["T2"], normalization=["zscore"],
                                 spacing=[3.0, 3.0, 3.0], group="MR")
KNEE = TABLE.get("knee")


@pytest.fixture(scope="module")
def knee_model(tmp_path_factory):
    """A small universal model with the task ``knee`` (3 classes) added, saved with its task table."""
    torch.manual_seed(0)
    model = UniSeg(features=(4, 8, 16, 16, 16, 16), patch_size=SMALL_PATCH, added_tasks=(3,), tasks=TABLE)
    return save_folder(tmp_path_factory.mktemp("models") / "knee", model.state_dict(), model.config, tasks=TABLE)


@pytest.fixture(scope="module")
def mr(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mr")
    return crop(sample("mr_small"), folder / "mr.nii.gz", (slice(30, 94), slice(14, 78), slice(2, 18)))


def predict(capsys, *args):
    cli.main(["predict", *map(str, args), "--tta", "False", "--progress", "False", "--json"])
    return json.loads(capsys.readouterr().out)


def test_the_model_table_names_the_tasks_to_run(knee_model):
    table = model_tasks(knee_model)
    assert table == TABLE and model_tasks("uniseg-11task") == OFFICIAL_TASKS  # read without weights or download
    assert resolve_tasks("knee", "MR", 1, table) == (KNEE,)
    assert resolve_tasks("all", "MR", 1, table) == (get_task("prostate"), KNEE)
    assert resolve_tasks("all", "MR", 1) == (get_task("prostate"),)  # the official table by default
    with pytest.raises(UnknownTaskError, match=r"knee \(11\)"):
        resolve_tasks("knie", "MR", 1, table)
    with pytest.raises(UnknownTaskError):
        resolve_tasks("knee", "MR", 1)


def test_merge_splits_each_task_by_its_own_channels():
    prostate = get_task("prostate")
    probs = torch.zeros(4 + 3, 3)  # prostate: the shared head's 4 channels; knee: its own 3
    probs[0:4, 0], probs[4:7, 0] = torch.tensor([0.1, 0.9, 0, 0]), torch.tensor([0.8, 0.1, 0.1])  # prostate
    probs[0:4, 1], probs[4:7, 1] = torch.tensor([0.9, 0.1, 0, 0]), torch.tensor([0.1, 0.2, 0.7])  # tibial
    probs[0:4, 2], probs[4:7, 2] = torch.tensor([0.1, 0.9, 0, 0]), torch.tensor([0.1, 0.8, 0.1])  # later wins
    merge = MergeTasksd("pred", [prostate, KNEE], channels=[4, 3])
    assert merge.merge(probs[:, :, None, None]).flatten().tolist() == [13, 19, 18]
    assert merge.num_classes == 20


def test_added_labels_have_colours_of_their_own_and_generic_codes():
    alone, merged = segments(KNEE.label_names, [KNEE]), segments(label_names([get_task("prostate"), KNEE]),
                                                                 [get_task("prostate"), KNEE])
    assert [s.colour for s in alone] == [s.colour for s in merged[1:]] == [PALETTE[17], colour(19)]
    assert merged[0].colour == PALETTE[12] and merged[0].type[2] == "Prostate"  # the official colour and code
    assert all(s.category == s.type == TISSUE and s.region is None for s in alone)
    assert [s.name for s in merged] == ["prostate: prostate", "knee: femoral cartilage", "knee: tibial cartilage"]
    assert len({colour(v) for v in range(1, 60)}) == 59  # beyond the palette, still one colour per value
    # an official structure's name in an added task is that task's label, not the official structure
    (liver,) = segments({1: "liver"}, [OFFICIAL_TASKS.with_task("other", labels=["liver"], channels=["CT"],
                                                                 normalization=["ct_window"], spacing=[1, 1, 1])[11]])
    assert liver.colour == PALETTE[17] and liver.type == TISSUE


def test_predict_an_added_task_and_all_tasks_with_it(knee_model, mr, tmp_path, capsys):
    one = predict(capsys, mr, "--task", "knee", "--model", knee_model, "--out", tmp_path / "knee")
    assert one["label_map"] == str(tmp_path / "knee" / "mr_knee.nii.gz") and one["task"] == "knee"
    labels = np.asanyarray(nib.load(one["label_map"]).dataobj)
    assert labels.shape == nib.load(mr).shape and set(np.unique(labels)) <= {0, 1, 2}
    assert [(r["label"], r["name"]) for r in one["volumes"]] == [(1, "femoral cartilage"), (2, "tibial cartilage")]
    assert json.loads(Path(one["volumes_json"]).read_text()) == one["volumes"]
    rows = Path(one["colour_table"]).read_text().splitlines()[2:]
    assert rows[1:] == [f"1 femoral_cartilage {' '.join(map(str, PALETTE[17]))} 255",
                        f"2 tibial_cartilage {' '.join(map(str, colour(19)))} 255"]
    assert '"tibial cartilage"' in Path(one["itksnap_labels"]).read_text()

    every = predict(capsys, mr, "--task", "all", "--modality", "MR", "--model", knee_model, "--out", tmp_path / "all")
    assert every["label_map"] == str(tmp_path / "all" / "mr_all.nii.gz")
    assert [(r["label"], r["name"]) for r in every["volumes"]] == [
        (13, "prostate: prostate"), (18, "knee: femoral cartilage"), (19, "knee: tibial cartilage")]
    merged = np.asanyarray(nib.load(every["label_map"]).dataobj)
    assert set(np.unique(merged)) <= {0, 13, 18, 19}
    rows = Path(every["colour_table"]).read_text().splitlines()[3:]
    assert rows == [f"13 prostate:_prostate {' '.join(map(str, PALETTE[12]))} 255",
                    f"18 knee:_femoral_cartilage {' '.join(map(str, PALETTE[17]))} 255",
                    f"19 knee:_tibial_cartilage {' '.join(map(str, colour(19)))} 255"]


def test_the_bundle_runs_an_added_task_from_the_model_folder(knee_model, mr, tmp_path, capsys):
    from monai.bundle import run

    from uniseg_hub.app.bundle import bundle_dir

    through_cli = predict(capsys, mr, "--task", "knee", "--model", knee_model, "--out", tmp_path / "cli",
                          "--preview", "False")
    bundle = bundle_dir()
    run(config_file=str(bundle / "configs" / "inference.json"), meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=False, bundle_root=str(bundle), weights=str(knee_model),
        input=str(mr), output_dir=str(tmp_path / "bundle"), task="knee", modality="MR", tta=False)
    bundle_map = nib.load(tmp_path / "bundle" / "mr_knee.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(bundle_map.dataobj),
                                  np.asanyarray(nib.load(through_cli["label_map"]).dataobj))
    assert "femoral_cartilage" in (tmp_path / "bundle" / "mr_knee_colors.ctbl").read_text()


def test_info_evaluate_and_the_model_card_list_the_model_tasks(knee_model, mr, tmp_path, capsys, monkeypatch):
    cli.main(["info", str(knee_model), "--json"])
    shown = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in shown["tasks"]] == [*OFFICIAL_TASKS.names(), "knee"]
    assert shown["tasks"][11]["labels"] == KNEE_LABELS
    cli.main(["info", str(knee_model)])
    assert "  knee (11): MR, channels ['T2']" in capsys.readouterr().out

    predictions, references = tmp_path / "pred", tmp_path / "labels"
    predictions.mkdir(), references.mkdir()
    image = nib.load(mr)
    reference = np.zeros(image.shape, np.uint8)
    reference[10:30, 10:30, 4:10], reference[30:50, 30:50, 4:10] = 1, 2
    nib.save(nib.Nifti1Image(reference, image.affine), references / "mr.nii.gz")
    nib.save(nib.Nifti1Image(reference, image.affine), predictions / "mr_knee.nii.gz")
    report = evaluate(predictions, references, model=knee_model, out_dir=tmp_path / "report", progress=False,
                      hd95=False, nsd=False)
    assert report["task"] == "knee"
    assert {r["name"] for r in report["rows"]} == set(KNEE_LABELS)

    monkeypatch.setattr(publishing, "packaged_bundle_dir", lambda required=True: None)
    result = publishing.publish(knee_model, "test-org/uniseg-knee", dry_run=True, out_dir=tmp_path / "card")
    card = (tmp_path / "card" / "README.md").read_text()
    assert "## Tasks" in card and "| `knee` | 11 | MR | T2 | femoral cartilage, tibial cartilage | 3 x 3 x 3 |" in card
    assert "| `liver` | 0 | CT | CT | liver, liver tumour |" in card
    entry = result["entry"]
    assert list(entry.preprocessing["tasks"]) == [*OFFICIAL_TASKS.names(), "knee"] and entry.tasks == TABLE
    # the manifest entry carries the table: a published model's tasks are known before anything is downloaded
    listed = {**entry.to_dict(), "revision": "0" * 40}
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"schema_version": 1, "models": [listed]}))
    assert model_tasks("uniseg-knee", manifest=str(manifest)) == TABLE
    with pytest.raises(ManifestError, match="tasks lists 12 tasks, but the architecture has 11"):
        ManifestEntry.from_dict({**listed, "architecture": UniSegConfig().to_dict()})


def test_preprocess_takes_an_added_task_from_its_model(knee_model, mr):
    from uniseg_hub import preprocess

    image = preprocess(mr, "knee", model=knee_model)
    spacing = np.linalg.norm(np.asarray(image.affine)[:3, :3], axis=0)
    np.testing.assert_allclose(spacing, KNEE.spacing, rtol=0.05)  # the knee task's 3 mm
    assert abs(float(image.mean())) < 1e-3  # its z-score
    assert preprocess(mr, "prostate").shape != image.shape  # prostate's 1.5 x 1.5 x 3 mm grid is another one
    with pytest.raises(UnknownTaskError, match="knee"):
        preprocess(mr, "knee")  # the official tasks know no knee
