"""Real sample scans for the demo, tests and benchmarks, fetched from PyPI and pinned by sha256.

The TotalSegmentator source distribution on PyPI (Apache-2.0 package; the images come from the TotalSegmentator
dataset, Zenodo 10.5281/zenodo.6802613) carries small real CT and MR volumes with label maps. ``pip download``
fetches it (any PyPI mirror pip is configured for works), with pip's progress bar on stderr when that is a terminal;
every sample is extracted at once, checked against the sha256 sums below and cached, and the 38 MB archive is then
deleted: the download happens once, and the cache keeps only the scans. Labels are TotalSegmentator predictions, not
manual ground truth.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ..errors import SampleDataError
from ..files import atomic_path, sha256_file

SDIST = "totalsegmentator==2.18.0"
SDIST_FILE = "totalsegmentator-2.18.0.tar.gz"
SDIST_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
SDIST_SIZE = 38_049_988
"""Bytes of the source archive (what the first ``fetch_sample`` downloads)."""
PREFIX = "totalsegmentator-2.18.0/tests/reference_files/"

SAMPLES = {
    # name: (path inside the sdist, sha256, description)
    "ct_small": ("example_ct_sm.nii.gz", "e50c00b2914e2cac0aaee8e7f3b5f57d44d9f21bfd5c0577271c54c0cb49e9fb",
                 "CT, upper abdomen, 122x101x30 at 3 mm"),
    "ct_small_seg": ("example_seg.nii.gz", "8be652475a4aaae83103a66bfb3345314b1fc06742807a06cf5005f7a7913a2d",
                     "TotalSegmentator 'total' labels of ct_small"),
    "mr_small": ("example_mr_sm.nii.gz", "209b46efaff595dd54a9332872e17a722b62654bbb68dbd89acd5090701bbd4f",
                 "MR, abdomen, 117x91x20 at 3 mm"),
    "mr_small_seg": ("example_seg_mr.nii.gz", "e73a5ee12962aa2bb2f3e43ab58dfc67990c5a7ef2dcb426a1bf5e5982b9587f",
                     "TotalSegmentator 'total_mr' labels of mr_small"),
    "ct": ("example_ct.nii.gz", "dbd3ae6d614d1d7ef3a46925c30c70038ed52da6b37fdd6afdc7b9b71387e3e1",
           "CT, thorax to pelvis, 122x101x112 at 3 mm"),
    "ct_torso_1.5mm": ("aorta_report/example_ct.nii.gz",
                       "372d98723e3283a8d4a0ae2f0ef1e581c0ad17b673b30b2e8d3e215180cc2a12",
                       "CT torso, 233x167x191 at 1.5 mm"),
}


def cache_dir() -> Path:
    """``$UNISEG_HUB_DATA`` or ``~/.cache/uniseg-hub/sample-data``."""
    return Path(os.environ.get("UNISEG_HUB_DATA", Path.home() / ".cache" / "uniseg-hub" / "sample-data"))


def _progress_sink(progress: bool | None):
    """Where pip's progress bar goes: our stderr (never stdout, which may carry JSON) when it is shown."""
    try:
        show = sys.stderr.isatty() if progress is None else bool(progress)
        return sys.stderr.fileno() if show else None
    except (AttributeError, OSError, ValueError):  # a captured or replaced stderr without a file descriptor
        return None


def _download_sdist(folder: Path, progress: bool | None = None) -> Path:
    sink = _progress_sink(progress)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", *(["--progress-bar", "on"] if sink is not None else
                                                          ["--quiet"]), "--no-deps", "--no-binary", ":all:", SDIST,
               "-d", tmp]
        result = subprocess.run(cmd, stdout=subprocess.PIPE if sink is None else sink, stderr=subprocess.PIPE,
                                text=True)
        archive = Path(tmp) / SDIST_FILE
        if result.returncode or not archive.is_file():
            tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise SampleDataError(f"could not download {SDIST} from PyPI ({tail}); check the network or pip's index "
                                  "settings, or put the sample files in $UNISEG_HUB_DATA")
        if sha256_file(archive) != SDIST_SHA256:
            raise SampleDataError(f"{SDIST_FILE} from PyPI does not match its pinned sha256; refusing to use it")
        target = folder / SDIST_FILE
        os.replace(archive, target)
        return target


def _is_cached(name: str) -> bool:
    member, sha256, _ = SAMPLES[name]
    path = cache_dir() / member
    return path.is_file() and sha256_file(path) == sha256


def download_size(names) -> int:
    """Bytes that ``fetch_sample`` of every name in ``names`` would download now: 0 when each is cached (or the
    verified archive is), else the archive's size. No network."""
    unknown = [n for n in names if n not in SAMPLES]
    if unknown:
        raise SampleDataError(f"unknown sample {unknown[0]!r}; the samples are: {', '.join(SAMPLES)}")
    if all(_is_cached(n) for n in names):
        return 0
    archive = cache_dir() / SDIST_FILE
    return 0 if archive.is_file() and sha256_file(archive) == SDIST_SHA256 else SDIST_SIZE


def fetch_sample(name: str, progress: bool | None = None) -> Path:
    """Path of a verified sample scan (see ``SAMPLES``), downloading and caching it on first use.

    The first call downloads the source archive (``SDIST_SIZE`` bytes; pip's progress bar on stderr when
    ``progress``, by default when stderr is a terminal), extracts and verifies every sample, and deletes the
    archive: later calls, for any sample, download nothing.
    """
    if name not in SAMPLES:
        raise SampleDataError(f"unknown sample {name!r}; the samples are: {', '.join(SAMPLES)}")
    path = cache_dir() / SAMPLES[name][0]
    if _is_cached(name):
        return path
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / SDIST_FILE
    if not archive.is_file() or sha256_file(archive) != SDIST_SHA256:
        archive = _download_sdist(folder, progress)
    try:
        with tarfile.open(archive) as tar:
            for sample in SAMPLES:
                if sample == name or not _is_cached(sample):
                    _extract(tar, sample)
        archive.unlink()  # every sample is cached now: the archive is never needed again
    except FileNotFoundError:  # another process extracted everything and deleted the archive meanwhile
        if not _is_cached(name):
            raise
    return path


def _extract(tar: tarfile.TarFile, name: str) -> None:
    member, sha256, _ = SAMPLES[name]
    data = tar.extractfile(PREFIX + member)
    if data is None:
        raise SampleDataError(f"{member} is missing from {SDIST_FILE}")
    with atomic_path(cache_dir() / member) as tmp:
        Path(tmp).write_bytes(data.read())
        if sha256_file(Path(tmp)) != sha256:
            raise SampleDataError(f"{member} does not match its pinned sha256; the cached archive may be damaged")
