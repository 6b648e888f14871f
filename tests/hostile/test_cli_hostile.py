"""Hostile use of the `uniseg-hub` command line, each case through the real CLI in a fresh process
(``python -m uniseg_hub``): bad options and values, bad scans, busy, unwritable, full or too-long outputs, errors
inside the bundle run, killed and interrupted runs, a closed pipe, a corrupt cache.

Every failure must be: the documented exit status (2 usage, 1 user error), exactly one line on stderr naming the
problem (no traceback), nothing on stdout, and the output folder and cache as they were (no partial set, no
temporary or lock file). Scans are tiny synthetic volumes and the model is the small converted checkpoint of
conftest, so a run takes seconds. A few cases patch one function inside the process (``DRIVER``) to make a
failure happen where it cannot be provoked from outside (a full disk, a bug inside the MONAI run).
"""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fakehub import cli_env, serve

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.hostile

DRIVER = """
import sys
patch, argv = sys.argv[1], sys.argv[2:]
exec(patch)
from uniseg_hub.cli import main
main(argv)
"""


def cli(*args, env, patch=None, timeout=300):
    command = [sys.executable, "-m", "uniseg_hub"] if patch is None else [sys.executable, "-c", DRIVER, patch]
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)


def one_line(result, code: int, *fragments: str) -> str:
    """The single stderr line of a run that had to fail with ``code`` and print nothing on stdout."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr[-3000:])
    assert result.stdout == "", result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def listing(folder: Path) -> list[str] | None:
    """Every name in ``folder``, hidden ones included (None if it does not exist)."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else None


OUTPUTS = ["ct_liver.nii.gz", "ct_liver_colors.ctbl", "ct_liver_itksnap_labels.txt", "ct_liver_preview.png",
           "ct_liver_volumes.csv", "ct_liver_volumes.json"]


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """Tiny synthetic scans (16x16x8 voxels of 2 mm: one sliding window of the small model) and broken ones."""
    folder = tmp_path_factory.mktemp("scans")
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    ct = (np.random.default_rng(0).normal(size=(16, 16, 8)) * 200).astype(np.float32)

    def save(name, array, a=affine):
        nib.save(nib.Nifti1Image(array, a), folder / name)
        return folder / name

    nan, inf = ct.copy(), ct.copy()
    nan[3, 3, 3], inf[3, 3, 3] = np.nan, np.inf
    shifted = affine.copy()
    shifted[0, 3] += 7.5
    (folder / "garbage.nii.gz").write_bytes(b"this is not an image")
    return {
        "ct": save("ct.nii.gz", ct), "tiny": save("tiny.nii.gz", ct[:2, :2, :1]), "nan": save("nan.nii.gz", nan),
        "inf": save("inf.nii.gz", inf), "zeros": save("zeros.nii.gz", np.zeros_like(ct)),
        "constant": save("constant.nii.gz", np.full_like(ct, 1e30)), "flat": save("flat.nii.gz", ct[:, :, 0]),
        "upper": save("SCAN.NII.GZ", np.full_like(ct, 7.0)), "shifted": save("shifted.nii.gz", ct, shifted),
        "garbage": folder / "garbage.nii.gz", "missing": folder / "missing.nii.gz",
        "long": save("a" * 240 + ".nii.gz", ct),
    }


@pytest.fixture
def env(tmp_path):
    """Offline, an empty cache of its own, the working tree's package."""
    return cli_env(None, tmp_path / "home", HF_HUB_OFFLINE="1", UNISEG_HUB_CACHE=tmp_path / "uniseg-cache",
                   PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), PAGER="cat")


def predict(scan, out, model, *extra, env, patch=None):
    return cli("predict", *([scan] if not isinstance(scan, list) else scan), "--model", model, "--out", out,
               "--device", "cpu", "--notta", "--noprogress", *extra, env=env, patch=patch)


# --- usage: rejected before anything runs (exit 2, one line) -----------------------------------------------------

USAGE = {
    "no command": ([], "no command given"),
    "unknown command": (["frobnicate"], "unknown command 'frobnicate'"),
    "switch given a word": (["predict", "ct.nii.gz", "--preview=maybe"], "--preview is a switch"),
    "tta given a word": (["predict", "ct.nii.gz", "--tta=maybe"], "tta must be 8, 4, 2 or 1 test-time flips"),
    "tta level unknown": (["predict", "ct.nii.gz", "--tta=3"], "tta must be 8, 4, 2 or 1 test-time flips"),
    "tta level twice": (["predict", "ct.nii.gz", "--tta", "4", "--notta"], "--tta is given more than once"),
    "unknown precision": (["predict", "ct.nii.gz", "--precision", "fp8"], "precision must be one of auto, fp32"),
    "switch given twice": (["predict", "ct.nii.gz", "--tta", "--notta"], "--tta is given more than once"),
    "option given twice": (["predict", "ct.nii.gz", "--model", "a", "--model=b"], "--model is given more than once"),
    "overlap not a number": (["predict", "ct.nii.gz", "--overlap", "abc"], "--overlap takes a number, got 'abc'"),
    "overlap out of range": (["predict", "ct.nii.gz", "--overlap", "1.5"], "overlap must be a number from 0"),
    "overlap nan": (["predict", "ct.nii.gz", "--overlap", "nan"], "overlap must be a number from 0"),
    "option without value": (["predict", "ct.nii.gz", "--out"], "option --out needs a value"),
    "misspelt option": (["predict", "ct.nii.gz", "--tas", "liver"], "unknown option --tas"),
    "unknown device": (["predict", "ct.nii.gz", "--device", "tpu"], "device must be cpu, cuda or cuda:N"),
    "unknown nan policy": (["predict", "ct.nii.gz", "--nan", "maybe"], "nan"),
    "unknown resampling": (["predict", "ct.nii.gz", "--resampling", "cubic"], "resampling"),
    "unknown modality": (["predict", "ct.nii.gz", "--modality", "PET"], "modality must be CT or MR"),
    "extra argument": (["download", "uniseg-11task", "extra"], "unexpected argument(s) extra"),
    "missing argument": (["info"], "`uniseg-hub info` needs NAME"),
    "missing arguments": (["convert"], "`uniseg-hub convert` needs SRC OUT_DIR"),
    "missing required option": (["publish", "folder"], "`uniseg-hub publish` needs --repo-id"),
    "int option not an int": (["export", "a", "b.onnx", "--in-channels", "x"], "--in-channels takes an integer"),
}


@pytest.mark.parametrize("case", USAGE)
def test_usage_errors_exit_2_with_one_line_before_anything_runs(case, env, tmp_path):
    args, fragment = USAGE[case]
    one_line(cli(*args, env=env), 2, fragment)
    assert not (tmp_path / "home").exists() and not Path("uniseg-output").exists()


def test_a_switch_takes_a_yes_or_no_word_and_never_swallows_an_input(env, tmp_path):
    """`--tta no` was taken as an input file name (a 2-channel input); now it is the switch's value."""
    one_line(cli("predict", "--tta", "no", "--out", tmp_path / "o", env=env), 1, "no input given")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["predict", "--help"], ["predict", "x.nii.gz", "--help"]])
def test_help_goes_to_stdout_and_exits_0(args, env):
    result = cli(*args, env=env)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert ("predict" in result.stdout) and ("--overlap" in result.stdout or args == ["--help"] or args == ["-h"])


def test_a_closed_pipe_ends_quietly(env):
    """`uniseg-hub list | head -1`: the reader is gone before the output; no BrokenPipeError traceback."""
    process = subprocess.Popen([sys.executable, "-m", "uniseg_hub", "list"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env)
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 141 and stderr == "", stderr


# --- bad scans: one line, exit 1, nothing written -----------------------------------------------------------------

BAD_SCANS = {
    "missing file": ("missing", [], "does not exist"),
    "not an image": ("garbage", [], "cannot read"),
    "2-D image": ("flat", [], "UniSeg segments 3-D volumes"),
    "all zeros": ("zeros", [], "is empty"),
    "constant 1e30": ("constant", [], "every voxel has the value 1e+30"),
    "upper-case name, constant": ("upper", [], "SCAN.NII.GZ is empty"),
    "infinite voxel": ("inf", [], "1 infinite voxel"),
    "NaN refused": ("nan", ["--nan", "refuse"], "1 NaN voxel"),
    "unknown task": ("ct", ["--task", "livr"], "unknown task 'livr'"),
    "two channels for a 1-channel task": (["ct", "ct"], [], "takes 1 channel"),
    "channels on different grids": (["ct", "shifted"], ["--task", "autopet"], "does not share the grid"),
}
ALREADY_TESTED = {"not an image", "2-D image", "all zeros", "infinite voxel", "NaN refused", "unknown task",
                  "two channels for a 1-channel task", "channels on different grids"}
"""Also in tests/bundle (in-process); here in the slow set, as each run loads MONAI (seconds)."""


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in ALREADY_TESTED else c
                                  for c in BAD_SCANS])
def test_bad_scans_fail_in_one_line_and_leave_nothing(case, scans, converted_small, env, tmp_path):
    which, extra, fragment = BAD_SCANS[case]
    scan = [scans[w] for w in which] if isinstance(which, list) else scans[which]
    out = tmp_path / "out"
    one_line(predict(scan, out, converted_small, *extra, env=env), 1, fragment)
    assert listing(out) is None  # not even the folder: it did not exist before


# --- outputs: checked and claimed before the segmentation ---------------------------------------------------------

def test_a_tiny_scan_is_segmented_with_preview_and_valid_json(scans, converted_small, env, tmp_path):
    """2x2x1 voxels: the label map, the preview and the tables; stdout is exactly the JSON document."""
    result = predict(scans["tiny"], tmp_path / "out", converted_small, "--json", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout)
    assert printed["task"] == "liver" and Path(printed["preview"]).is_file()
    assert listing(tmp_path / "out") == ["tiny_liver.nii.gz", "tiny_liver_colors.ctbl", "tiny_liver_itksnap_labels.txt",
                                         "tiny_liver_preview.png", "tiny_liver_volumes.csv", "tiny_liver_volumes.json"]
    assert nib.load(printed["label_map"]).shape == (2, 2, 1)


@pytest.mark.slow
def test_existing_outputs_are_kept_without_overwrite(scans, converted_small, env, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "ct_liver_volumes.csv").write_text("keep me")
    one_line(predict(scans["ct"], out, converted_small, env=env), 1, "ct_liver_volumes.csv already exists",
             "--overwrite")
    assert listing(out) == ["ct_liver_volumes.csv"] and (out / "ct_liver_volumes.csv").read_text() == "keep me"


def unwritable(tmp_path: Path) -> tuple[Path, str]:
    """An output folder that cannot be created, and what the error says (root may write anywhere: /proc)."""
    if os.geteuid() == 0:
        return Path("/proc/uniseg-hub-test/out"), "cannot create the output folder"
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    return locked / "out", "cannot write to the output folder"


def test_an_unwritable_output_folder_is_named_before_the_segmentation(scans, converted_small, env, tmp_path):
    out, fragment = unwritable(tmp_path)
    line = one_line(predict(scans["ct"], out, converted_small, env=env), 1, fragment, "--out")
    assert "suitable writer" not in line and not out.exists()
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    one_line(predict(scans["ct"], blocker / "out", converted_small, env=env), 1, "is a file")
    assert blocker.read_text() == "a file, not a folder"


def test_an_output_name_too_long_for_the_file_system_is_refused_first(scans, converted_small, env, tmp_path):
    one_line(predict(scans["long"], tmp_path / "out", converted_small, env=env), 1, "bytes long",
             "rename or link the input")
    assert listing(tmp_path / "out") is None


def test_too_little_free_space_is_refused_before_the_segmentation(scans, converted_small, env, tmp_path):
    full = ("import shutil, collections, uniseg_hub.app.predict as p\n"
            "shutil.disk_usage = lambda path: collections.namedtuple('u', 'total used free')(10**9, 10**9, 1000)\n"
            "p.run_workflow = lambda workflow: (_ for _ in ()).throw(AssertionError('the segmentation ran'))\n")
    one_line(predict(scans["ct"], tmp_path / "out", converted_small, env=env, patch=full), 1,
             "not enough free space for the outputs", "0.0 MB are free")
    assert listing(tmp_path / "out") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_a_cuda_device_without_cuda_is_one_line(scans, converted_small, env, tmp_path):
    one_line(cli("predict", scans["ct"], "--model", converted_small, "--out", tmp_path / "out", "--device", "cuda",
                 env=env), 1, "--device cuda", "--device cpu")
    assert listing(tmp_path / "out") is None


def test_a_second_run_on_outputs_being_written_stops_at_once(scans, converted_small, env, tmp_path):
    """Another process holds the outputs' lock (as a running predict does): refused in one line, nothing touched."""
    out = tmp_path / "out"
    out.mkdir()
    lock = out / ".ct_liver.nii.gz.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps({"pid": os.getpid(), "started": "2026-12-07 01:00:00"}).encode())
        started = time.perf_counter()
        one_line(predict(scans["ct"], out, converted_small, env=env), 1, f"process {os.getpid()}",
                 "wait for it to finish or choose another --out folder")
        assert time.perf_counter() - started < 60
        assert listing(out) == [lock.name]
    finally:
        os.close(fd)


def test_a_killed_runs_partial_outputs_and_temp_files_do_not_block_the_rerun(scans, converted_small, env, tmp_path):
    """What SIGKILL leaves: the lock file with the dead run's record, a label map without its companions, a
    temporary file. The rerun recognises them (a warning), replaces the set and removes the leftovers."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".ct_liver.nii.gz.lock").write_text(json.dumps({"pid": 2 ** 22 + 1, "started": "earlier"}))
    (out / "ct_liver.nii.gz").write_bytes(b"half a label map")
    (out / ".ct_liver_preview.png.x1y2z3.tmp.png").write_bytes(b"half a preview")
    (out / "other.txt").write_text("not ours")
    result = predict(scans["ct"], out, converted_small, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "left incomplete by a run that was killed" in result.stderr and "Traceback" not in result.stderr
    assert listing(out) == sorted([*OUTPUTS, "other.txt"])
    assert nib.load(out / "ct_liver.nii.gz").shape == (16, 16, 8)


def test_a_failure_inside_the_bundle_run_is_one_line_and_stdout_stays_clean(scans, converted_small, env, tmp_path):
    """A bug inside MONAI's evaluator (ignite's exception handlers and MONAI's StatsHandler log it with a traceback
    to stdout): the command line shows one line, says it is a bug, and writes nothing, even with --json."""
    bug = ("import uniseg_hub.pipeline as p\n"
           "def broken(self, data): raise ValueError('injected failure')\n"
           "p.ArgMaxd.__call__ = broken\n")
    one_line(predict(scans["ct"], tmp_path / "out", converted_small, "--json", env=env, patch=bug), 1,
             "unexpected ValueError: injected failure", "UNISEG_HUB_TRACEBACK=1")
    assert listing(tmp_path / "out") is None


def test_progress_bars_add_nothing_to_a_failure_on_a_stderr_that_is_not_a_terminal(scans, converted_small, env,
                                                                                    tmp_path):
    """--progress is the default: a run that fails after reading, preprocessing and the sliding window (their bars
    are shown on a terminal only) still writes one line on stderr."""
    bug = "import uniseg_hub.pipeline as p\np.ArgMaxd.__call__ = lambda self, data: 1 / 0\n"
    result = cli("predict", scans["ct"], "--model", converted_small, "--out", tmp_path / "out", "--device", "cpu",
                 "--notta", "--progress", env=env, patch=bug)
    one_line(result, 1, "unexpected ZeroDivisionError")
    assert listing(tmp_path / "out") is None


@pytest.mark.slow
def test_a_failed_write_names_its_cause_and_leaves_no_partial_set(scans, converted_small, env, tmp_path):
    """The disk fills while the label map is written: the cause (not MONAI's "cannot find a suitable writer"), and
    no label map, temporary file or lock behind."""
    full = ("import errno, monai.data\n"
            "def write(self, filename, **kwargs): open(filename, 'wb').write(b'x'); "
            "raise OSError(errno.ENOSPC, 'No space left on device', filename)\n"
            "monai.data.NibabelWriter.write = write\n")
    out = tmp_path / "out"
    out.mkdir()
    line = one_line(predict(scans["ct"], out, converted_small, env=env, patch=full), 1, "No space left on device")
    assert "suitable writer" not in line and listing(out) == []


@pytest.mark.slow
def test_a_failure_after_the_label_map_removes_the_whole_set(scans, converted_small, env, tmp_path):
    """The preview fails after the label map and tables were written: none of them stays (and a rerun works)."""
    broken = "import uniseg_hub.app.report as r\nr.render_preview = lambda *a, **k: 1 / 0\n"
    one_line(predict(scans["ct"], tmp_path / "out", converted_small, env=env, patch=broken), 1,
             "unexpected ZeroDivisionError")
    assert listing(tmp_path / "out") is None


@pytest.mark.slow
def test_an_upper_case_input_name_gives_the_right_output_names(scans, converted_small, env, tmp_path):
    upper = tmp_path / "CT.NII.GZ"
    upper.write_bytes(scans["ct"].read_bytes())
    result = predict(upper, tmp_path / "out", converted_small, "--nopreview", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert listing(tmp_path / "out") == ["CT_liver.nii.gz", "CT_liver_colors.ctbl", "CT_liver_itksnap_labels.txt",
                                         "CT_liver_volumes.csv", "CT_liver_volumes.json"]


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_a_run_killed_midway_leaves_nothing_that_blocks_the_rerun(how, scans, converted_small, env, tmp_path):
    """Killed once its outputs are claimed: SIGTERM and Ctrl-C clean up at once (exit 143, 130); after SIGKILL the
    next run cleans up. Either way the rerun succeeds and leaves exactly the outputs."""
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "uniseg_hub", "predict", scans["ct"], "--model", converted_small,
                                "--out", out, "--device", "cpu", "--noprogress"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not (out / ".ct_liver.nii.gz.lock").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(how)
    stdout, stderr = process.communicate(timeout=120)
    assert stdout == "" and "Traceback" not in stderr, stderr
    if how != signal.SIGKILL:
        assert process.returncode == {signal.SIGTERM: 143, signal.SIGINT: 130}[how], stderr
        assert listing(out) in (None, [])
    result = predict(scans["ct"], out, converted_small, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert listing(out) == OUTPUTS


# --- the cache: reported, never changed by a read-only command ----------------------------------------------------

def test_path_reports_a_corrupt_cached_file_and_keeps_it(fake_hub, small_release, tmp_path):
    manifest, entry = serve(fake_hub, small_release, tmp_path / "m.json", endpoint=False)
    env = cli_env(fake_hub, tmp_path / "home", UNISEG_HUB_MANIFEST=manifest,
                  PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    downloaded = cli("download", "uniseg-small", env=env)
    assert downloaded.returncode == 0, downloaded.stderr
    blob = Path(downloaded.stdout.strip()).resolve()
    damaged = blob.read_bytes()[::-1]
    blob.write_bytes(damaged)
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    one_line(cli("path", "uniseg-small", env=offline), 1, "uniseg-hub download uniseg-small --force")
    assert blob.read_bytes() == damaged  # reported, not deleted
    one_line(cli("path", "uniseg-small", "--json", env=offline), 1, "sha256")
    assert Path(downloaded.stdout.strip()).exists()


def test_errors_of_the_file_system_are_one_line(env, tmp_path):
    """convert of a missing file and into an unwritable folder: the cause in one line."""
    one_line(cli("convert", tmp_path / "missing.model", tmp_path / "out", env=env), 1, "missing.model")
    assert listing(tmp_path / "out") is None
