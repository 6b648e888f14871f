"""``uniseg-hub demo``: what it says before it runs (downloads, sizes, duration), and the Dice table after it."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from uniseg_hub import cli
from uniseg_hub.app import demo as demo_app
from uniseg_hub.app import sample_data
from uniseg_hub.app.agreement import TOTALSEGMENTATOR_CLASSES
from uniseg_hub.hub import load_manifest
from uniseg_hub.pipeline.estimate import window_positions
from uniseg_hub.tasks import get_task

from scans import crop, sample

BOX = (slice(30, 90), slice(25, 75), slice(10, 22))  # liver, kidneys, spleen and pancreas of the sample CT
TOTAL = TOTALSEGMENTATOR_CLASSES["total"]


def test_plan_names_the_sample_download_and_its_size_until_it_is_cached(tmp_path, monkeypatch):
    real = {name: sample(name) for name in (demo_app.DEMO_SCAN, demo_app.DEMO_REFERENCE)}  # from the usual cache
    monkeypatch.setenv("UNISEG_HUB_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("UNISEG_HUB_CACHE", str(tmp_path / "converted"))
    weights, scans = demo_app.plan_downloads()
    assert (scans.size, scans.cached) == (sample_data.SDIST_SIZE, False) and "PyPI" in scans.source
    # the default model is not published: its original checkpoint, size unknown, but the network's is said
    assert not weights.cached and weights.size is None and "google" in weights.source
    assert "32.1 M parameters" in weights.detail and "128 MB" in weights.detail

    (tmp_path / "data").mkdir()
    for name, path in real.items():
        shutil.copy(path, tmp_path / "data" / sample_data.SAMPLES[name][0])
    scans = demo_app.plan_downloads()[1]
    assert (scans.size, scans.cached) == (0, True)
    (tmp_path / "data" / sample_data.SAMPLES[demo_app.DEMO_REFERENCE][0]).write_bytes(b"damaged")
    assert demo_app.plan_downloads()[1].size == sample_data.SDIST_SIZE  # not the pinned file: fetched again


def test_plan_takes_a_published_size_from_the_manifest_and_a_folder_as_is(tmp_path, converted_small):
    document = json.loads(open(load_manifest().path).read())
    entry = document["models"][0]
    entry.update(published=True, repo_id="org/uniseg-11task", revision="a" * 40, sha256="b" * 64, size=128_456_789)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(document))
    weights = demo_app.plan_downloads(manifest=str(path))[0]
    assert (weights.size, weights.cached) == (128_456_789, False) and "org/uniseg-11task" in weights.source
    local = demo_app.plan_downloads(str(converted_small))[0]
    assert local.cached and str(converted_small) in local.source


@pytest.fixture
def cropped_samples(tmp_path, monkeypatch):
    """The demo's scan and TotalSegmentator's map of it, both cropped to BOX (the same grid)."""
    files = {demo_app.DEMO_SCAN: crop(sample(demo_app.DEMO_SCAN), tmp_path / "example_ct_sm.nii.gz", BOX),
             demo_app.DEMO_REFERENCE: crop(sample(demo_app.DEMO_REFERENCE), tmp_path / "seg.nii.gz", BOX)}
    monkeypatch.setattr(sample_data, "fetch_sample", lambda name: files[name])
    return files


@pytest.mark.slow
def test_demo_notes_on_stderr_then_paths_and_dice_table_on_stdout(converted_small, cropped_samples, tmp_path,
                                                                   capsys):
    out = tmp_path / "demo"
    cli.main(["demo", "--weights", str(converted_small), "--out", str(out), "--device", "cpu"])
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 3 and "note:" not in captured.out
    assert f"the folder {converted_small}, nothing to download" in notes[0]
    assert "sample CT" in notes[1]
    # the estimate counts the windows the run takes (the crop at the liver task's spacing, the small patch)
    header = nib.load(cropped_samples[demo_app.DEMO_SCAN]).header
    windows = window_positions(header.get_data_shape(), header.get_zooms(), get_task("liver").spacing, (64, 64, 32))
    assert f"liver: {windows} windows x" in notes[2] and f"all: {windows} windows x" in notes[2]
    assert notes[2].startswith("note: the run on cpu will take about ")

    lines = captured.out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("agreement with TotalSegmentator"))
    assert any(str(out / "example_ct_sm_liver.nii.gz") in line for line in lines[:start])  # paths first
    assert lines[start + 1].split() == ["case", "task", "organ", "Dice", "UniSeg", "mL", "TotalSeg", "mL"]
    rows = [line.split() for line in lines[start + 2:]]
    assert [(r[0], r[1], r[2]) for r in rows] == [("example_ct_sm", "liver", "liver")] + [
        ("example_ct_sm", "all", organ) for organ in ("liver", "kidney", "pancreas", "spleen")]
    assert len({len(line.rstrip()) for line in lines[start + 1:]}) == 1  # aligned columns

    # each Dice is that of the written label map against the reference, recomputed here with numpy
    reference = np.asanyarray(nib.load(cropped_samples[demo_app.DEMO_REFERENCE]).dataobj)
    theirs = {"liver": [TOTAL["liver"]], "kidney": [TOTAL["kidney_left"], TOTAL["kidney_right"]],
              "pancreas": [TOTAL["pancreas"]], "spleen": [TOTAL["spleen"]]}
    for case, task, organ, shown, *_ in rows:
        labels = np.asanyarray(nib.load(out / f"example_ct_sm_{task}.nii.gz").dataobj)
        value = 1 if task != "all" else get_task(organ).merged_labels[0]
        a, b = labels == value, np.isin(reference, theirs[organ])
        assert b.any(), f"{organ} is not in the crop"
        assert shown == f"{2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()):.3f}"


def test_demo_command_prints_notes_before_the_run_and_the_table_after(monkeypatch, capsys):
    """The command line's part alone (no network, no model): notes on stderr before anything runs, the paths and
    the aligned Dice table on stdout; a Dice of None (organ absent from the reference) shows as n/a."""
    from uniseg_hub.app.agreement import Agreement
    from uniseg_hub.app.predict import Prediction
    from uniseg_hub.pipeline.estimate import RunEstimate, WindowTimes

    order = []
    plan = [demo_app.Download("the official UniSeg checkpoint for uniseg-11task", "https://drive.example/x", None,
                              False, "size not recorded in the manifest"),
            demo_app.Download("the sample CT and TotalSegmentator's label map of it", "PyPI", 38_049_988, False)]
    setup = demo_app.DemoSetup("uniseg-11task", "scan.nii.gz", "seg.nii.gz", "liver",
                               [RunEstimate("liver", 1, 4, 1, 25.0, 100.0), RunEstimate("all", 8, 4, 1, 180.0, 720.0)],
                               WindowTimes(5.0, 20.0, "cpu"))
    result = demo_app.DemoResult(
        [Prediction("out/example_ct_sm_liver.nii.gz", "liver", 90.0), Prediction("out/example_ct_sm_all.nii.gz",
                                                                                  "all", 700.0)],
        [Agreement("example_ct_sm", "liver", "liver", 0.9512, 1001.25, 1043.118),
         Agreement("example_ct_sm", "all", "pancreas", None, 3.0, 0.0)], setup.estimates)

    def plan_downloads(weights):
        order.append("plan")
        return plan

    def prepare_demo(weights, task, tta, device):
        order.append(("prepare", capsys.readouterr().err))  # what was said before the downloads
        return setup

    def run_demo(got, out, tta, device, progress):
        order.append(("run", capsys.readouterr().err))  # what was said before the run
        assert got is setup and progress is False  # no bars: stderr is not a terminal here
        return result

    monkeypatch.setattr(demo_app, "plan_downloads", plan_downloads)
    monkeypatch.setattr(demo_app, "prepare_demo", prepare_demo)
    monkeypatch.setattr(demo_app, "run_demo", run_demo)
    cli.main(["demo"])
    captured = capsys.readouterr()
    assert order[0] == "plan"
    assert order[1][1].splitlines() == [
        "note: downloads the official UniSeg checkpoint for uniseg-11task from https://drive.example/x (size not "
        "recorded in the manifest)",
        "note: downloads the sample CT and TotalSegmentator's label map of it from PyPI (38.0 MB)"]
    assert order[2][1].splitlines() == [
        "note: the run on cpu will take about 14 min (liver: 4 windows x 25.0 s; all: 4 windows x 180.0 s; one "
        "window timed on this machine)"]
    assert captured.err == ""
    assert captured.out.splitlines() == [
        "liver: out/example_ct_sm_liver.nii.gz (90.0 s)",
        "all: out/example_ct_sm_all.nii.gz (700.0 s)",
        "agreement with TotalSegmentator's label map of the same scan (Dice; a prediction of another model, not "
        "ground truth):",
        "case           task   organ      Dice  UniSeg mL  TotalSeg mL",
        "example_ct_sm  liver  liver     0.951     1001.2       1043.1",
        "example_ct_sm  all    pancreas    n/a        3.0          0.0",
    ]


def test_the_sample_archive_is_downloaded_once_with_progress_and_not_kept(tmp_path, monkeypatch):
    import hashlib
    import io
    import subprocess
    import tarfile

    members = {name: f"scan {name}".encode() for name in sample_data.SAMPLES}
    monkeypatch.setattr(sample_data, "SAMPLES", {name: (member, hashlib.sha256(members[name]).hexdigest(), "")
                                                 for name, (member, _, _) in sample_data.SAMPLES.items()})
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(sample_data.PREFIX + sample_data.SAMPLES[name][0])
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    archive = buffer.getvalue()
    monkeypatch.setattr(sample_data, "SDIST_SHA256", hashlib.sha256(archive).hexdigest())
    monkeypatch.setenv("UNISEG_HUB_DATA", str(tmp_path / "data"))
    calls = []

    def pip(cmd, **kwargs):  # a fake `pip download`: the archive into -d
        calls.append((cmd, kwargs))
        (tmp_path.joinpath(cmd[cmd.index("-d") + 1]) / sample_data.SDIST_FILE).write_bytes(archive)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(sample_data.subprocess, "run", pip)
    stderr = tmp_path / "stderr"
    with stderr.open("w") as sink:
        monkeypatch.setattr(sample_data.sys, "stderr", sink)
        path = sample_data.fetch_sample("ct_small", progress=True)
    assert path.read_bytes() == members["ct_small"]
    (cmd, kwargs), = calls
    assert "--progress-bar" in cmd and "--quiet" not in cmd
    assert kwargs["stdout"] not in (None, subprocess.PIPE)  # pip's bar on our stderr, never on stdout
    assert not (tmp_path / "data" / sample_data.SDIST_FILE).exists()  # the 38 MB archive is not kept
    for name in sample_data.SAMPLES:  # every other sample comes from the cache: no second download
        assert sample_data.fetch_sample(name).read_bytes() == members[name]
    assert len(calls) == 1 and sample_data.download_size(list(sample_data.SAMPLES)) == 0
    # a progress=False download is --quiet, its output captured
    (tmp_path / "data" / sample_data.SAMPLES["ct"][0]).unlink()
    sample_data.fetch_sample("ct", progress=False)
    assert "--quiet" in calls[1][0] and calls[1][1]["stdout"] is subprocess.PIPE


@pytest.mark.slow  # the full-size model on one patch
def test_quickstart_removes_what_it_writes_to_temporary_space(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(root), "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, str(root / "examples" / "quickstart.py")], capture_output=True,
                            text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "liver logits (1, 4, 192, 192, 64)" in result.stdout
    assert list(tmp_path.iterdir()) == []  # the converted folder went to TMPDIR and was removed
