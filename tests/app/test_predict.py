"""``uniseg-hub predict`` and ``demo`` as people run them: subprocesses on real scans, DICOM, all tasks, bad input."""

import io
import json
import os
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from dicom_series import write_series
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from matplotlib import image as mpimg

from uniseg_hub import cli
from uniseg_hub.app.report import PREVIEW_SIZE
from uniseg_hub.tasks import get_task, merged_label_names, tasks_in_group

from scans import crop, sample


def uniseg(*args, env=None):
    return subprocess.run([sys.executable, "-m", "uniseg_hub", *map(str, args)], capture_output=True, text=True,
                          env=env)


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ct")
    return crop(sample("ct_small"), folder / "abdomen.nii.gz", (slice(20, 60), slice(30, 70), slice(8, 24)))


@pytest.mark.slow
def test_predict_writes_label_map_preview_and_volumes(converted_small, ct, tmp_path):
    result = uniseg("predict", ct, "--task", "liver", "--out", tmp_path, "--model", converted_small,
                    "--tta", "False", "--probabilities", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    label_map = nib.load(summary["label_map"])
    source = nib.load(ct)
    assert label_map.shape == source.shape and np.allclose(label_map.affine, source.affine, atol=1e-4)
    labels = np.asanyarray(label_map.dataobj)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2}
    probabilities = nib.load(summary["probabilities"])
    # (x, y, z, 3): the liver task's 3 classes (background, liver, tumour; the predictor keeps the task's own
    # channels), which MONAI's NIfTI writer moves from first (channel-first tensor) to last (NIfTI's 4th axis)
    assert probabilities.shape == (*source.shape, 3)
    assert np.allclose(probabilities.affine, source.affine, atol=1e-4)

    # the volume table agrees with the label map and the voxel spacing
    voxel_ml = float(np.prod(source.header.get_zooms()[:3])) / 1000
    table = json.loads(open(summary["volumes_json"]).read())
    assert [r["name"] for r in table] == ["liver", "liver tumour"]
    for row in table:
        count = int((labels == row["label"]).sum())
        assert row["voxels"] == count and row["volume_ml"] == pytest.approx(count * voxel_ml, abs=1e-3)
    assert open(summary["volumes_csv"]).read().splitlines()[0] == "label,name,voxels,volume_ml"

    # the preview is a real PNG of the promised size, with coloured (overlay) pixels
    picture = mpimg.imread(summary["preview"])
    assert picture.shape[:2] == (PREVIEW_SIZE[1], PREVIEW_SIZE[0])
    rgb = picture[..., :3]
    coloured = (np.ptp(rgb, axis=-1) > 0.15).mean()
    assert coloured > 0.01, "no overlay visible in the preview"

    # a second run keeps the outputs unless --overwrite
    again = uniseg("predict", ct, "--task", "liver", "--out", tmp_path, "--model", converted_small, "--tta", "False")
    assert again.returncode == 1 and "already exists" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.slow
def test_dicom_series_gives_the_same_label_map_as_nifti(converted_small, ct, tmp_path):
    pytest.importorskip("itk")
    series = write_series(ct, tmp_path / "series")
    for source, out in ((ct, tmp_path / "nifti"), (series, tmp_path / "dicom")):
        result = uniseg("predict", source, "--task", "spleen", "--out", out, "--model", converted_small,
                        "--tta", "False", "--preview", "False")
        assert result.returncode == 0, result.stderr[-2000:]
    from_nifti = nib.load(tmp_path / "nifti" / "abdomen_spleen.nii.gz")
    from_dicom = nib.load(tmp_path / "dicom" / "series_spleen.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(from_dicom.dataobj), np.asanyarray(from_nifti.dataobj))
    np.testing.assert_allclose(from_dicom.affine, from_nifti.affine, atol=1e-3)


@pytest.mark.slow
def test_task_all_equals_the_tasks_one_by_one_merged(converted_small, ct, tmp_path):
    # The official all-tasks rule works on full-head probabilities in the network's grid (MergeTasksd), with one
    # spacing for all tasks (the official -spacing). On an input already at that spacing the grid is the input's,
    # so per-task probability maps at the same spacing, merged by the official rule, give the all-tasks map.
    image = nib.load(ct)
    at_spacing = tmp_path / "ct_1.5mm.nii.gz"
    affine = image.affine.copy()
    affine[:3, :3] = np.diag([1.5, 1.5, 3.0]) * np.sign(np.diag(image.affine[:3, :3]))
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj)[:, :, :10], affine), at_spacing)
    result = uniseg("predict", at_spacing, "--task", "all", "--out", tmp_path / "all", "--model", converted_small,
                    "--tta", "False", "--preview", "False")
    assert result.returncode == 0, result.stderr[-2000:]
    merged = np.asanyarray(nib.load(tmp_path / "all" / "ct_1.5mm_all.nii.gz").dataobj)
    expected = np.zeros_like(merged)
    from uniseg_hub.app.predict import bundle_workflow, run_workflow

    for task in tasks_in_group("CT"):
        out = tmp_path / task.name
        overrides = {"input": str(at_spacing), "task": task.name, "output_dir": str(out), "tta": False,
                     "weights": str(converted_small), "save_probabilities": True, "spacing": [1.5, 1.5, 3.0],
                     "predictor#crop_classes": False}
        (case,) = run_workflow(bundle_workflow(overrides))
        assert case["probabilities"] == str(out / f"ct_1.5mm_{task.name}_probabilities.nii.gz")
        probs = np.asanyarray(nib.load(case["probabilities"]).dataobj)
        labels = probs.reshape(*merged.shape, -1).argmax(-1)
        for index, value in enumerate(task.merged_labels, 1):
            expected[labels == index] = value
    np.testing.assert_array_equal(merged, expected)
    table = {r["label"]: r for r in json.loads((tmp_path / "all" / "ct_1.5mm_all_volumes.json").read_text())}
    assert set(table) == set(merged_label_names("CT")) - {0}


def one_line_error(result):
    lines = result.stderr.strip().splitlines()
    return result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in \
        result.stderr


@pytest.mark.slow
def test_failures_are_one_line_with_exit_status_1(converted_small, ct, tmp_path):
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti")
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8), np.float32), np.eye(4)), flat)
    cases = {
        "unreadable": (["predict", tmp_path / "bad.nii.gz"], "cannot read"),
        "dimensions": (["predict", flat], "3-D"),
        "unknown task": (["predict", ct, "--task", "livr"], "liver (0)"),
        "missing": (["predict", tmp_path / "none.nii.gz"], "does not exist"),
        "geometry": (["predict", ct, flat, "--task", "autopet"], "grid"),
    }
    for name, (args, message) in cases.items():
        result = uniseg(*args, "--out", tmp_path / "out", "--model", converted_small, "--tta", "False")
        assert one_line_error(result), f"{name}: {result.stderr[-1500:]}"
        assert message in result.stderr, f"{name}: {result.stderr}"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_demo_without_reachable_weights_says_how_to_get_them(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin",
           "UNISEG_HUB_DATA": str(tmp_path / "data")}
    env.update({k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ})  # the package under test
    result = uniseg("demo", "--out", tmp_path / "demo", env=env)
    # first what it would download (size), then one error line; nothing fetched, no run-time estimate
    *notes, error = result.stderr.strip().splitlines()
    assert result.returncode == 1 and error.startswith("error:") and "Traceback" not in result.stderr
    assert [n.split(" ")[:2] for n in notes] == [["note:", "downloads"]] * 2, result.stderr
    assert "official UniSeg checkpoint" in notes[0] and "MB in float32" in notes[0]
    assert "sample CT" in notes[1] and "(38.0 MB)" in notes[1]
    assert "uniseg-hub convert" in error and "uniseg-hub publish" in error
    assert not (tmp_path / "data").exists(), "the demo fetched the sample before knowing it has weights"


@pytest.mark.slow
def test_demo_with_converted_weights(converted_small, tmp_path):
    result = uniseg("demo", "--weights", converted_small, "--out", tmp_path, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    runs = summary["runs"]
    assert [r["task"] for r in runs] == ["liver", "all"]
    for run in runs:
        assert nib.load(run["label_map"]).shape == nib.load(sample("ct_small")).shape
        assert mpimg.imread(run["preview"]).shape[:2] == (PREVIEW_SIZE[1], PREVIEW_SIZE[0])
    # the Dice against TotalSegmentator's map: liver (task liver), liver, kidney, pancreas, spleen (all tasks)
    assert [(a["task"], a["organ"]) for a in summary["agreement"]] == [("liver", "liver")] + [
        ("all", organ) for organ in ("liver", "kidney", "pancreas", "spleen")]
    assert all(0 <= a["dice"] <= 1 for a in summary["agreement"])
    assert [(e["task"], e["windows"]) for e in summary["estimate"]] == [("liver", 42), ("all", 42)]


# property-based: whatever the header, affine, shape or values, a valid output or one clean error line
shapes = st.one_of(st.tuples(*[st.integers(1, 20)] * 3), st.tuples(st.integers(2, 12), st.integers(2, 12)),
                   st.tuples(st.integers(2, 10), st.integers(2, 10), st.integers(2, 10), st.sampled_from([1, 2])))


@st.composite
def nifti_cases(draw):
    shape = draw(shapes)
    dtype = draw(st.sampled_from([np.int16, np.uint8, np.float32, np.float64]))
    kind = draw(st.sampled_from(["ct", "zeros", "nan", "inf", "constant"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    data = rng.normal(0, 300, size=shape)
    if kind == "zeros":
        data[:] = 0
    elif kind == "constant":
        data[:] = 40
    elif kind in ("nan", "inf") and np.issubdtype(dtype, np.floating):
        data.flat[draw(st.integers(0, data.size - 1))] = np.nan if kind == "nan" else np.inf
    data = np.clip(data, np.iinfo(dtype).min, np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else data
    spacing = [draw(st.floats(0.6, 5.0)) for _ in range(3)]
    signs = [draw(st.sampled_from([-1, 1])) for _ in range(3)]
    affine = np.diag([*(s * g for s, g in zip(spacing, signs)), 1.0])
    if draw(st.booleans()):  # an oblique grid
        angle = draw(st.floats(-0.5, 0.5))
        rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
        affine[:3, :3] = rotation @ affine[:3, :3]
    affine[:3, 3] = [draw(st.floats(-200, 200)) for _ in range(3)]
    image = nib.Nifti1Image(data.astype(dtype), affine)
    image.set_qform(affine, code=draw(st.sampled_from([0, 1, 2])))
    image.set_sform(affine, code=draw(st.sampled_from([0, 1, 2])))
    return image


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(image=nifti_cases())
def test_any_nifti_gives_a_valid_output_or_one_clean_error(converted_small, tmp_path_factory, image, capsys):
    folder = tmp_path_factory.mktemp("case")
    path = folder / "scan.nii.gz"
    nib.save(image, path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", str(path), "--out", str(folder / "out"), "--model", str(converted_small),
                  "--tta", "False", "--preview", "False", "--progress", "False"])
        raise SystemExit(0)
    err = capsys.readouterr().err
    if exit_info.value.code in (0, None):
        written = nib.load(folder / "out" / "scan_liver.nii.gz")
        assert written.shape == image.shape[:3] and written.get_data_dtype() == np.uint8
        assert set(np.unique(np.asanyarray(written.dataobj))) <= set(range(get_task("liver").num_classes))
    else:
        lines = err.strip().splitlines()
        assert exit_info.value.code == 1 and len(lines) == 1 and lines[0].startswith("error:"), err
        assert not (folder / "out").exists() or not any((folder / "out").iterdir())


# --- progress bars (issue 18): one labelled bar per stage, on stderr, only on a terminal ---------------------------

STAGE_LABELS = ("reading: ", "preprocessing: ", "sliding window (", "writing: ")


class Terminal(io.StringIO):
    """A stderr that says it is a terminal (where the command line shows its bars)."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def random_scan(tmp_path_factory):
    """A random CT of 100x72x20 voxels at the liver task's spacing (1.5, 1.5, 3 mm): 3x2x1 windows of the small
    model (patch 64x64x32)."""
    path = tmp_path_factory.mktemp("random") / "scan.nii.gz"
    data = (np.random.default_rng(3).normal(size=(100, 72, 20)) * 300).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 3.0, 1.0])), path)
    return path


def run_main(args, stderr, monkeypatch, capsys) -> str:
    """``cli.main(args)`` with ``stderr`` as sys.stderr; its real stdout."""
    monkeypatch.setattr(sys, "stderr", stderr)
    try:
        cli.main([str(a) for a in args])
    except SystemExit as e:
        assert e.code in (0, None), stderr.getvalue()[-3000:]
    finally:
        monkeypatch.undo()
    return capsys.readouterr().out


def stage_positions(text: str) -> list[int]:
    """Where each stage's label first appears in ``text`` (-1: missing)."""
    return [text.find(label) for label in STAGE_LABELS]


def test_each_stage_of_a_prediction_has_a_labelled_bar_on_stderr_only(converted_small, random_scan, tmp_path,
                                                                      monkeypatch, capsys):
    common = [random_scan, "--model", converted_small, "--notta", "--device", "cpu", "--json"]
    terminal = Terminal()
    stdout = run_main(["predict", *common, "--out", tmp_path / "bars"], terminal, monkeypatch, capsys)
    err = terminal.getvalue()
    positions = stage_positions(err)
    assert -1 not in positions and positions == sorted(positions), err  # every label, in the stages' order
    assert re.search(r"sliding window \(6 windows\): 100%.* 6/6 ", err), err  # the count, as the bar's total
    assert re.search(r"writing: 100%.* 3/3 ", err), err  # label map (the bundle), volume tables, preview
    assert re.search(r"reading: 100%.* 1/1 ", err) and re.search(r"preprocessing: 100%.* 1/1 ", err), err
    # stdout is the JSON result alone: no bar, no label
    result = json.loads(stdout)
    assert not any(label in stdout for label in STAGE_LABELS) and "\r" not in stdout and "%|" not in stdout

    # --noprogress on a terminal, and the default on a stderr that is not a terminal: no bar, the same outputs
    quiet, plain = Terminal(), io.StringIO()
    off = json.loads(run_main(["predict", *common, "--out", tmp_path / "off", "--noprogress", "--nopreview"], quiet,
                              monkeypatch, capsys))
    piped = json.loads(run_main(["predict", *common, "--out", tmp_path / "piped", "--nopreview"], plain,
                                monkeypatch, capsys))
    for text in (quiet.getvalue(), plain.getvalue()):
        assert stage_positions(text) == [-1] * 4 and "%|" not in text, text
    first = nib.load(result["label_map"])
    for other in (off, piped):
        again = nib.load(other["label_map"])
        np.testing.assert_array_equal(np.asanyarray(again.dataobj), np.asanyarray(first.dataobj))
        assert np.array_equal(again.affine, first.affine) and other["volumes"] == result["volumes"]


def test_the_bars_of_a_real_terminal_and_a_clean_stdout(converted_small, random_scan, tmp_path):
    """Through the real command line with stderr on a pseudo-terminal and stdout on a pipe."""
    import fcntl
    import pty
    import struct
    import termios
    import threading

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty has 0 columns
    process = subprocess.Popen([sys.executable, "-m", "uniseg_hub", "predict", str(random_scan), "--model",
                                str(converted_small), "--notta", "--device", "cpu", "--nopreview", "--json",
                                "--out", str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    chunks = []

    def drain():
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the terminal's last writer is gone (EIO)
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    stdout, _ = process.communicate(timeout=300)
    reader.join(timeout=10)
    os.close(master)
    err = b"".join(chunks).decode(errors="replace")
    assert process.returncode == 0, err[-3000:]
    positions = stage_positions(err)
    assert -1 not in positions and positions == sorted(positions), err
    assert re.search(r"writing: 100%.* 2/2 ", err), err  # label map and volume tables (no preview)
    assert json.loads(stdout)["preview"] is None and "%|" not in stdout


def test_stage_bars_are_silent_when_off_and_know_their_stages():
    from uniseg_hub.pipeline.progress import StageBars

    out = Terminal()
    off = StageBars(enabled=False, file=out)
    off.stage("reading")({"image": 1})
    off.step("x")
    off.end()
    assert out.getvalue() == ""
    with pytest.raises(ValueError, match="the stages are reading, preprocessing, sliding window, writing"):
        off.stage("loading")
    on = StageBars(enabled="true", writes=2, file=out)
    assert on.stage("writing")({"image": 1}) == {"image": 1} and on.bar.total == 2
    on.step("label map")
    on.step("preview")
    assert on.bar is None and "writing: 100%" in out.getvalue() and "preview" in out.getvalue()
