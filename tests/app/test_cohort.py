"""Cohorts (issue 16): ``uniseg-hub predict`` over a folder, a glob or a datalist, the model built once, a failed
case reported and skipped, a rerun resuming, ranks under torchrun and ``--shard`` parts giving the outputs of a
single process voxel for voxel, and the bundle itself taking the same datalist.

Scans are tiny synthetic volumes (16 x 16 x 8 voxels of 2 mm, one sliding window of the small model), each case
different, so that a mix-up of cases would show in the comparisons.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import uniseg_hub
from uniseg_hub import cli
from uniseg_hub.app.cohort import is_complete, parse_shard
from uniseg_hub.app.predict import bundle_workflow, predict, run_workflow
from uniseg_hub.errors import InputError
from uniseg_hub.pipeline.cases import (
    datalist,
    discover_cases,
    folder_cases,
    is_cohort,
    read_datalist,
    shard_cases,
)

ROOT = Path(__file__).resolve().parents[2]
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def scan(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data = (rng.normal(size=(16, 16, 8)) * 200 + seed * 10).astype(np.float32)
    nib.save(nib.Nifti1Image(data, AFFINE), path)
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Five readable cases and one that is not a NIfTI file (sorted fourth)."""
    folder = tmp_path_factory.mktemp("cohort")
    for i in range(5):
        scan(folder / f"case{i}.nii.gz", seed=i)
    (folder / "case2_broken.nii.gz").write_bytes(b"not an image")
    return folder


def labels(path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


def run_cli(*args, capsys):
    """``uniseg-hub`` in this process: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as info:
        cli.main([str(a) for a in args])
        raise SystemExit(0)
    out = capsys.readouterr()
    return info.value.code or 0, out.out, out.err


# --- what a cohort is ---------------------------------------------------------------------------------------------

def test_a_folder_of_nifti_files_is_a_set_of_cases_with_nnunet_channels_grouped(tmp_path):
    for name in ("b_0000.nii.gz", "b_0001.nii.gz", "a.nii.gz", "c.nii", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    series = tmp_path / "patient7"
    series.mkdir()
    (series / "IM0001").write_bytes(b"x")
    (series / "IM0002.dcm").write_bytes(b"x")
    cases = folder_cases(tmp_path)
    assert cases == [{"image": str(tmp_path / "a.nii.gz")},
                     {"image": [str(tmp_path / "b_0000.nii.gz"), str(tmp_path / "b_0001.nii.gz")]},
                     {"image": str(tmp_path / "c.nii")}, {"image": str(series)}]
    assert is_cohort([str(tmp_path)]) and not is_cohort([str(series)])  # a series folder is one case
    assert datalist(dataset_dir=str(tmp_path)) == cases  # the bundle's dataset_dir: the same cases
    assert is_cohort([str(tmp_path / "*.nii.gz")]) and not is_cohort([str(tmp_path / "a.nii.gz")])
    assert not is_cohort([str(tmp_path / "a.nii.gz"), str(tmp_path / "c.nii")])  # one file per channel
    globbed = discover_cases([str(tmp_path / "*.nii*")])
    assert [c["image"] for c in globbed] == [str(tmp_path / "a.nii.gz"), [str(tmp_path / "b_0000.nii.gz"),
                                             str(tmp_path / "b_0001.nii.gz")], str(tmp_path / "c.nii")]
    with pytest.raises(InputError, match="names no case"):
        discover_cases([str(tmp_path / "*.mha")])


def test_datalists_decathlon_json_and_csv_with_channel_columns(tmp_path):
    (tmp_path / "sub").mkdir()
    decathlon = {"name": "x", "training": [{"image": "sub/t.nii.gz", "label": "sub/l.nii.gz"}],
                 "testing": ["sub/a.nii.gz", {"image": ["sub/b_ct.nii.gz", "/abs/b_pet.nii.gz"]}]}
    (tmp_path / "datalist.json").write_text(json.dumps(decathlon))
    assert read_datalist(tmp_path / "datalist.json") == [
        {"image": str(tmp_path / "sub" / "a.nii.gz")},
        {"image": [str(tmp_path / "sub" / "b_ct.nii.gz"), "/abs/b_pet.nii.gz"]}]
    with open(tmp_path / "cases.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "image_0000", "image_0001"])
        writer.writerow(["p1", "sub/p1_ct.nii.gz", "sub/p1_pet.nii.gz"])
        writer.writerow(["p2", "/abs/p2_ct.nii.gz", "/abs/p2_pet.nii.gz"])
    assert read_datalist(tmp_path / "cases.csv") == [
        {"case": "p1", "image": [str(tmp_path / "sub" / "p1_ct.nii.gz"), str(tmp_path / "sub" / "p1_pet.nii.gz")]},
        {"case": "p2", "image": ["/abs/p2_ct.nii.gz", "/abs/p2_pet.nii.gz"]}]
    assert datalist(datalist_file=str(tmp_path / "cases.csv")) == read_datalist(tmp_path / "cases.csv")
    (tmp_path / "bad.csv").write_text("label\nx.nii.gz\n")
    with pytest.raises(InputError, match="names no image"):
        read_datalist(tmp_path / "bad.csv")
    (tmp_path / "train_only.json").write_text(json.dumps({"training": []}))
    with pytest.raises(InputError, match="no 'testing' list"):
        read_datalist(tmp_path / "train_only.json")
    (tmp_path / "twice.csv").write_text("image\nx/a.nii.gz\ny/a.nii.gz\n")
    with pytest.raises(InputError, match="both named a"):
        discover_cases([str(tmp_path / "twice.csv")])


def test_shards_are_deterministic_disjoint_and_cover_every_case():
    cases = [f"c{i}" for i in range(7)]
    parts = [shard_cases(cases, i, 3) for i in range(3)]
    assert parts == [shard_cases(cases, i, 3) for i in range(3)]
    assert sorted(sum(parts, [])) == cases and max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parts[0] == ["c0", "c3", "c6"]
    assert parse_shard("2/3") == (1, 3) and parse_shard(None) is None
    for bad in ("0/3", "4/3", "1", "a/b", "1/0"):
        with pytest.raises(InputError, match="--shard takes I/N"):
            parse_shard(bad)


def test_sharded_evaluation_splits_a_datalist_as_predict_does(monkeypatch):
    from uniseg_hub.training import distributed

    cases = [{"image": f"c{i}.nii.gz"} for i in range(5)]
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    for rank in (0, 1):
        monkeypatch.setattr(distributed.dist, "get_rank", lambda rank=rank: rank)
        assert distributed.shard(cases) == shard_cases(cases, rank, 2) == cases[rank::2]


def test_a_bad_shard_or_loader_is_a_usage_error_before_anything_runs(tmp_path, capsys):
    for args, fragment in ((["--shard", "3/2"], "--shard takes I/N"), (["--loader", "fork"], "--loader takes")):
        code, stdout, stderr = run_cli("predict", tmp_path, "--out", tmp_path / "out", *args, capsys=capsys)
        assert code == 2 and stdout == "" and fragment in stderr and len(stderr.splitlines()) == 1, stderr
    assert not (tmp_path / "out").exists()
    one = scan(tmp_path / "one.nii.gz", seed=0)
    assert discover_cases([str(one)]) == [{"image": str(one)}]  # under torchrun a single case is a cohort of one


# --- one run over a cohort ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_cohort_loads_the_model_once_reports_a_bad_case_and_resumes(cohort, converted_small, tmp_path, capsys,
                                                                      monkeypatch):
    loads = []
    real = uniseg_hub.load_model
    monkeypatch.setattr(uniseg_hub, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    out = tmp_path / "out"
    common = ["--out", out, "--model", converted_small, "--notta", "--device", "cpu"]
    code, stdout, stderr = run_cli("predict", cohort, *common, capsys=capsys)
    assert len(loads) == 1, "the model was built more than once for one cohort"
    # exit 1: one case failed; stdout is the table, stderr the progress bar and one error line
    assert code == 1, stderr
    rows = [line.split()[:2] for line in stdout.splitlines()[1:-1]]
    assert rows == [["case0", "done"], ["case1", "done"], ["case2", "done"], ["case2_broken", "failed"],
                    ["case3", "done"], ["case4", "done"]], stdout
    assert "cannot read" in stdout and "6 cases: 5 done, 1 failed" in stdout
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "1 of 6 cases failed" in errors[0] and "Traceback" not in stderr
    assert "6/6" in stderr and ("case/s" in stderr or "s/case" in stderr)  # the progress bar counted cases
    assert "preprocessing" not in stderr and "sliding window" not in stderr  # no per-case stage bars
    report = json.loads((out / "predict_report.json").read_text())
    assert [c["status"] for c in report["cases"]] == ["done", "done", "done", "failed", "done", "done"]
    assert report["ok"] is False and report["counts"]["failed"] == 1
    with open(out / "predict_report.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["case"] for r in table] == ["case0", "case1", "case2", "case2_broken", "case3", "case4"]
    assert "cannot read" in table[3]["error"] and float(table[0]["seconds"]) > 0
    assert not [p for p in os.listdir(out) if p.startswith("case2_broken") or p.startswith(".")]  # no partial set
    first = {i: labels(out / f"case{i}_liver.nii.gz") for i in (0, 1, 3, 4)}

    # the cohort's outputs are those of a single prediction of the same case
    alone = predict(str(cohort / "case3.nii.gz"), out_dir=str(tmp_path / "alone"), weights=str(converted_small),
                    tta=False, progress=False, device="cpu")
    np.testing.assert_array_equal(labels(alone.label_map), first[3])
    assert sorted(os.listdir(tmp_path / "alone")) == sorted(p for p in os.listdir(out) if p.startswith("case3_"))

    # a rerun skips the complete cases, redoes a partial one (a file missing) and the failed one (still failing)
    (out / "case1_liver_preview.png").unlink()
    (out / "case4_liver.nii.gz").write_bytes(b"")  # a killed run's label map: its lock file is left too
    (out / ".case4_liver.nii.gz.lock").write_text('{"pid": 1}')
    assert not is_complete({"label_map": str(out / "case4_liver.nii.gz")})
    code, stdout, stderr = run_cli("predict", cohort, *common, "--noprogress", capsys=capsys)
    assert code == 1 and len(loads) == 3  # the cohort, the single case, the rerun: once each
    statuses = dict(line.split()[:2] for line in stdout.splitlines()[1:-1])
    assert statuses == {"case0": "skipped", "case1": "done", "case2": "skipped", "case2_broken": "failed",
                        "case3": "skipped", "case4": "done"}, stdout
    for i in (0, 1, 3, 4):
        np.testing.assert_array_equal(labels(out / f"case{i}_liver.nii.gz"), first[i])
    assert (out / "case1_liver_preview.png").is_file() and not (out / ".case4_liver.nii.gz.lock").exists()

    # --fail-fast stops at the failure: the cases after it are not run
    code, stdout, _ = run_cli("predict", cohort, *common[2:], "--out", tmp_path / "fast", "--noprogress",
                              "--fail-fast", capsys=capsys)
    statuses = dict(line.split()[:2] for line in stdout.splitlines()[1:-1])
    assert code == 1 and statuses == {"case0": "done", "case1": "done", "case2": "done", "case2_broken": "failed",
                                      "case3": "not", "case4": "not"}, stdout
    assert not (tmp_path / "fast" / "case3_liver.nii.gz").exists()


@pytest.mark.slow
def test_a_cohort_that_succeeds_exits_0_and_json_is_the_report(cohort, converted_small, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("predict", str(cohort / "case[01].nii.gz"), "--out", out, "--model",
                                   converted_small, "--notta", "--device", "cpu", "--json", "--nopreview",
                                   "--loader", "thread", capsys=capsys)
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["ok"] and [c["case"] for c in report["cases"]] == ["case0", "case1"]
    assert report["report_csv"] == str(out / "predict_report.csv")
    assert sorted(os.listdir(out)) == sorted(["predict_report.csv", "predict_report.json"] + [
        f"case{i}_liver{s}" for i in (0, 1) for s in (".nii.gz", "_volumes.json", "_volumes.csv",
                                                     "_colors.ctbl", "_itksnap_labels.txt")])


@pytest.mark.slow
def test_the_bundle_takes_the_same_csv_datalist(cohort, converted_small, tmp_path):
    (tmp_path / "cases.csv").write_text("case,image\na," + str(cohort / "case0.nii.gz") + "\nb,"
                                        + str(cohort / "case1.nii.gz") + "\n")
    cases = run_workflow(bundle_workflow({"datalist_file": str(tmp_path / "cases.csv"), "weights": str(converted_small),
                                          "tta": False, "output_dir": str(tmp_path / "bundle"),
                                          "device": "$torch.device('cpu')"}))
    assert [Path(c["label_map"]).name for c in cases] == ["case0_liver.nii.gz", "case1_liver.nii.gz"]
    for i in (0, 1):
        alone = predict(str(cohort / f"case{i}.nii.gz"), out_dir=str(tmp_path / f"alone{i}"),
                        weights=str(converted_small), tta=False, progress=False, device="cpu", preview=False)
        np.testing.assert_array_equal(labels(cases[i]["label_map"]), labels(alone.label_map))


# --- ranks and shards ---------------------------------------------------------------------------------------------

def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.slow
def test_two_gloo_ranks_and_two_shards_give_the_single_process_outputs(cohort, converted_small, tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    for i in range(5):
        os.symlink(cohort / f"case{i}.nii.gz", good / f"case{i}.nii.gz")
    common = ["--model", str(converted_small), "--notta", "--device", "cpu", "--noprogress", "--nopreview"]
    single = subprocess.run([sys.executable, "-m", "uniseg_hub", "predict", str(good), "--out", str(tmp_path / "one"),
                             *common], capture_output=True, text=True, env=_env(), timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    ranked = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "uniseg_hub", "predict", str(good), "--out", str(tmp_path / "ranks"), *common,
                             "--json"], capture_output=True, text=True, env=_env(), timeout=600)
    assert ranked.returncode == 0, ranked.stderr[-3000:]
    report = json.loads(ranked.stdout)  # rank 0 alone prints: one JSON document, the merged report
    assert report["ranks"] == 2 and [c["case"] for c in report["cases"]] == [f"case{i}" for i in range(5)]
    assert [c["rank"] for c in report["cases"]] == [0, 1, 0, 1, 0] and report["ok"]
    shards = [subprocess.Popen([sys.executable, "-m", "uniseg_hub", "predict", str(good), "--out",
                                str(tmp_path / "shards"), *common, "--shard", f"{i}/2"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=_env()) for i in (1, 2)]
    for process in shards:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
    parts = [json.loads((tmp_path / "shards" / f"predict_report_shard-{i}-of-2.json").read_text()) for i in (1, 2)]
    assert [[c["case"] for c in p["cases"]] for p in parts] == [["case0", "case2", "case4"], ["case1", "case3"]]
    for i in range(5):
        expected = labels(tmp_path / "one" / f"case{i}_liver.nii.gz")
        for other in ("ranks", "shards"):
            np.testing.assert_array_equal(labels(tmp_path / other / f"case{i}_liver.nii.gz"), expected)


@pytest.mark.slow
def test_a_folder_of_dicom_series_is_a_cohort_of_one_case_per_series(cohort, converted_small, tmp_path, capsys):
    pytest.importorskip("itk")
    from dicom_series import write_series

    studies = tmp_path / "studies"
    for i in (0, 1):
        write_series(cohort / f"case{i}.nii.gz", studies / f"patient{i}")
    code, stdout, stderr = run_cli("predict", studies, "--out", tmp_path / "out", "--model", converted_small,
                                   "--notta", "--device", "cpu", "--noprogress", "--nopreview", capsys=capsys)
    assert code == 0, stderr
    assert [line.split()[:2] for line in stdout.splitlines()[1:-1]] == [["patient0", "done"], ["patient1", "done"]]
    alone = predict(str(studies / "patient1"), out_dir=str(tmp_path / "alone"), weights=str(converted_small),
                    tta=False, progress=False, device="cpu", preview=False)
    np.testing.assert_array_equal(labels(tmp_path / "out" / "patient1_liver.nii.gz"), labels(alone.label_map))
