"""Files: atomic writes (every file uniseg-hub produces appears whole or not at all), sha256, readable JSON."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_prefix(target: str | os.PathLike) -> str:
    """The name prefix of ``atomic_path``'s temporary files for ``target``: ``.<name>.``, or for a name over 200
    characters its first 80 and a hash of the whole, so that a target name the file system takes (checked before
    any work) never fails at its temporary name. ``stale_temp_files`` finds them."""
    name = Path(target).name
    if len(name) <= 200:
        return f".{name}."
    return f".{name[:80]}~{hashlib.sha1(name.encode()).hexdigest()[:8]}."


def stale_temp_files(target: str | os.PathLike) -> list[Path]:
    """Temporary files ``atomic_path`` left beside ``target`` when its process was killed (SIGKILL, power loss):
    only the caller knows that no live process is writing them (``uniseg-hub predict`` holds the outputs' lock)."""
    target = Path(target)
    prefix = temp_prefix(target)
    try:
        return sorted(p for p in target.parent.iterdir()
                      if p.name.startswith(prefix) and ".tmp" in p.name[len(prefix):])
    except OSError:
        return []


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path beside ``target``; on success it is synced, given the usual permissions and renamed
    onto ``target``; on any failure (or interruption) it is removed. ``suffix`` keeps writers that choose a format
    by extension happy (``.nii.gz``, ``.onnx``)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=temp_prefix(target), suffix=f".tmp{suffix}")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        Path(tmp).write_text(text)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _flat(value) -> bool:
    return isinstance(value, list) and all(
        not isinstance(v, (dict, list)) or (isinstance(v, list) and not any(isinstance(w, (dict, list)) for w in v))
        for v in value)


def format_json(value, level: int = 0) -> str:
    """JSON indented by two spaces, with lists of numbers or strings (and of such lists) and short objects of
    plain values kept on one line."""
    pad, end = "  " * (level + 1), "\n" + "  " * level
    if isinstance(value, dict) and value and not (
            all(not isinstance(v, (dict, list)) for v in value.values()) and len(json.dumps(value)) <= 80):
        return "{\n" + ",\n".join(f"{pad}{json.dumps(k)}: {format_json(v, level + 1)}" for k, v in value.items()) \
            + end + "}"
    if isinstance(value, list) and value and not _flat(value):
        return "[\n" + ",\n".join(pad + format_json(v, level + 1) for v in value) + end + "]"
    return json.dumps(value)
