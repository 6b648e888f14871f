"""The outputs of one prediction, claimed before any work: one run at a time writes them, they are checked before
the segmentation (names, space, a writable folder), and they appear as a whole set or not at all.

``claim_outputs`` holds an exclusive lock on a file beside the outputs (``.<label map>.lock``, an ``fcntl`` lock
the kernel drops when the process dies, so a killed run never blocks the next one). The lock file holds the
owner's process id while it runs and is removed when it ends; finding it still there means that the run that
wrote it was killed (SIGKILL, power loss) before it finished, so the outputs it left are an incomplete set that
the next run may replace, and the temporary files it left (``files.stale_temp_files``) are removed. A run that
fails or is interrupted removes the outputs it wrote itself.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..files import stale_temp_files, temp_prefix

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


@dataclass
class Claim:
    """What ``claim_outputs`` found: ``interrupted`` is the record of a run that was killed while writing these
    outputs (``{"pid", "host", "started"}``), or None; ``removed``, the temporary files it left and this run
    removed."""

    lock: Path
    interrupted: dict | None
    removed: list[Path]


def lock_path(label_map: str | os.PathLike) -> Path:
    """The lock file of a prediction's outputs, beside its label map."""
    return Path(label_map).with_name(temp_prefix(label_map) + "lock")


def check_names(paths: Mapping[str, str] | list[str]) -> None:
    """``InputError`` for an output name longer than the file system takes, before any work (the names follow
    the input's: ``<case>_<task>...``)."""
    for path in (paths.values() if isinstance(paths, Mapping) else paths):
        folder = _existing_parent(Path(path).absolute().parent)
        try:
            limit = os.pathconf(folder, "PC_NAME_MAX")
        except (OSError, ValueError, AttributeError):
            limit = 255
        name = Path(path).name
        if len(os.fsencode(name)) > limit:
            raise InputError(f"the output name {name[:40]}...{name[-20:]} is {len(os.fsencode(name))} bytes long, "
                             f"more than the {limit} the file system allows; outputs are named after the input "
                             "(<case>_<task>...): rename or link the input with a shorter name")


def check_space(folder: str | os.PathLike, needed: int) -> None:
    """``InputError`` when ``folder``'s file system has fewer than ``needed`` bytes free (with 1 MiB to spare)."""
    try:
        free = shutil.disk_usage(_existing_parent(Path(folder).absolute())).free
    except OSError:
        return
    if free < needed + (1 << 20):
        raise InputError(f"not enough free space for the outputs in {folder}: they take up to "
                         f"{_mb(needed + (1 << 20))}, {_mb(free)} are free; free some space or choose another --out "
                         "folder")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _stamp(path: str) -> tuple | None:
    try:
        s = os.stat(path)
    except OSError:
        return None
    return s.st_ino, s.st_size, s.st_mtime_ns


def _lock(fd: int) -> bool:
    """Take the exclusive lock on ``fd`` without waiting; False if another process holds it."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # pragma: no cover - Windows
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES, errno.EDEADLK):
            return False
        raise
    return True


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _open_locked(lock: Path, label_map: str) -> tuple[int, dict | None]:
    """(fd of the lock file, locked; the record found in it, i.e. a killed run's, or None)."""
    for _ in range(20):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OSError(e.errno, f"cannot write to the output folder ({e.strerror}); choose another --out folder",
                          str(lock.parent)) from None
        if not _lock(fd):
            os.close(fd)
            record = _read_record(lock) or {}
            who = f"process {record['pid']}" if "pid" in record else "another process"
            since = f", running since {record['started']}" if "started" in record else ""
            raise InputError(f"another uniseg-hub predict ({who}{since}) is writing {label_map} and the files beside "
                             "it; wait for it to finish or choose another --out folder")
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:  # not a file its previous owner removed after we opened it
            break
        os.close(fd)
    else:
        raise InputError(f"could not lock {lock}: it keeps being replaced; is another program writing there?")
    with os.fdopen(os.dup(fd), "r+") as f:
        text = f.read()
        record = None
        if text.strip():
            try:
                record = json.loads(text)
            except ValueError:
                record = {}
            record = record if isinstance(record, dict) else {}
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
        f.flush()
    return fd, record


@contextlib.contextmanager
def claim_outputs(planned: Mapping[str, str]) -> Iterator[Claim]:
    """Hold the outputs ``planned`` (``{"label_map": path, ...}``, all in one folder) for one run.

    Creates the folder, takes the lock (``InputError`` at once if another run holds it; ``OSError`` if the folder
    cannot be written), removes the temporary files a killed run left, and yields a ``Claim``. If the body fails or
    is interrupted, the planned files it created or replaced are removed (never the ones it left as they were,
    unless a killed run left them: an incomplete set).
    The lock file goes when the body ends, however it ends, short of the process being killed.
    """
    label_map = planned["label_map"]
    folder = Path(label_map).parent
    created = []  # the folders this run creates, deepest first: removed again if it fails and leaves them empty
    missing = folder.absolute()
    while not missing.exists() and missing != missing.parent:
        created.append(missing)
        missing = missing.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(errno.ENOTDIR, "the output folder is a file; choose another --out folder",
                                 str(folder)) from None
    except OSError as e:
        raise OSError(e.errno, f"cannot create the output folder ({e.strerror}); choose another --out folder",
                      str(folder)) from None
    lock = lock_path(label_map)
    try:
        fd, record = _open_locked(lock, label_map)
    except BaseException:
        _remove_empty(created)
        raise
    failed = False
    try:
        removed = []
        for path in planned.values():
            for stale in stale_temp_files(path):
                with contextlib.suppress(OSError):
                    stale.unlink()
                    removed.append(stale)
        before = {path: _stamp(path) for path in planned.values()}
        try:
            yield Claim(lock=lock, interrupted=record, removed=removed)
        except BaseException:
            for path, stamp in before.items():
                if _stamp(path) != stamp or record is not None:  # a killed run's files: an incomplete set too
                    with contextlib.suppress(OSError):
                        os.unlink(path)
            failed = True
            raise
    finally:
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                os.unlink(lock)
        os.close(fd)
        if failed:
            _remove_empty(created)


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return
