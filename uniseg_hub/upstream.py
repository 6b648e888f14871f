"""Models that exist only as their original checkpoint: fetched, verified and converted on first use.

A manifest entry that is not published on the Hub but names an ``upstream`` file (the official model: a Google Drive
file) is served from a per-model cache folder, ``$UNISEG_HUB_CACHE/NAME/`` when that variable is set, else
``HF_HUB_CACHE/uniseg-hub/NAME/`` (``cache_dir`` replaces ``HF_HUB_CACHE``). The first use, under a file lock so that
concurrent first uses end with one file:

1. logs the licence (and the size when known), then downloads the file with ``gdown`` into the folder (gdown keeps
   a ``.part`` file that a later run resumes);
2. verifies it before trusting anything: the pinned size and sha256 when the manifest has them; always, the
   allow-listed ``weights_only`` reader must read it without running anything, and its tensors must be exactly the
   entry's architecture (names, shapes), floating point and finite. An unpinned file is accepted on that evidence,
   with one warning naming the sha256 seen;
3. converts it (``weights.convert_state_dict`` + ``weights.save_folder``, atomic writes), records the converted
   ``model.safetensors``'s sha256 in ``converted.json`` last (the commit point), and deletes the original.

Every later load hashes the converted file against that record, so a cache damaged afterwards is caught. Offline
(``HF_HUB_OFFLINE=1``, ``local_files_only=True``) a recorded conversion is used without any request. torch is
imported only to verify and convert, so the offline and cached paths (and ``uniseg-hub download`` of a published
model) start without it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from . import hub
from .config import WEIGHTS_FILE, ManifestEntry
from .errors import (
    ChecksumError,
    DownloadError,
    IncompatibleCheckpointError,
    IncompleteDownloadError,
    NotAvailableOfflineError,
    UnisegHubError,
    UpstreamFileError,
)
from .files import format_json, sha256_file, write_text_atomic

logger = logging.getLogger(__name__)

CACHE_ENV = "UNISEG_HUB_CACHE"
RECORD_FILE = "converted.json"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding one converted folder per model: ``cache_dir/uniseg-hub`` when given, else
    ``$UNISEG_HUB_CACHE``, else ``HF_HUB_CACHE/uniseg-hub``."""
    if cache_dir is None and os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser().resolve()
    return hub.cache_folder(cache_dir) / "uniseg-hub"


def download(name: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
             local_files_only: bool = False, force: bool = False, manifest=None,
             token: str | bool | None = None) -> Path:
    """The verified local weights file of the manifest model ``name``: its Hub copy when published
    (``hub.download``), else its ``upstream`` checkpoint fetched, verified and converted on first use.

    Arguments as for ``hub.download``; ``revision`` and ``token`` apply to Hub copies only. A converted copy that no
    longer matches its record raises ``ChecksumError`` (``force=True`` converts afresh); a fetched file that is not
    the model raises ``UpstreamFileError`` and is deleted; network failures raise ``DownloadError`` (a broken transfer
    ``IncompleteDownloadError``: run again to resume); offline without a converted copy
    ``NotAvailableOfflineError``.
    """
    m = hub.load_manifest(manifest)
    entry = m.entry(str(name))
    if entry.published or entry.upstream is None or revision is not None:
        return hub.download(name, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                            force=force, manifest=m, token=token)
    folder = cache_root(cache_dir) / entry.name
    offline = hub.offline_reason(local_files_only)
    if force and offline:
        raise NotAvailableOfflineError(f"force=True fetches {entry.name} again, but downloads are off ({offline}); "
                                       "allow downloads or drop force")
    with hub.cache_lock(folder.parent / ".locks" / f"{entry.name}.lock"):
        if not force and _is_recorded(entry, folder):
            return folder / WEIGHTS_FILE
        if offline:
            raise NotAvailableOfflineError(
                f"{entry.name} has no converted copy in {folder} and downloads are off ({offline}): run "
                f"`uniseg-hub download {entry.name}` where the network is available (same {CACHE_ENV} or "
                f"HF_HUB_CACHE) and copy {folder} here, or download {entry.upstream.url} yourself and run "
                f"`uniseg-hub convert {entry.upstream.filename} ./{entry.name}`, then load ./{entry.name}")
        return _fetch_and_convert(entry, folder, force)


def verify(name: str, cache_dir: str | os.PathLike | None = None, manifest=None) -> Path:
    """Hash the cached weights of ``name`` (no network): a Hub copy against the manifest (``hub.verify``), a
    converted original against the sha256 recorded when it was converted (``ChecksumError`` if they differ)."""
    entry = hub.load_manifest(manifest).entry(str(name))
    if entry.published or entry.upstream is None:
        return hub.verify(name, cache_dir=cache_dir, manifest=manifest)
    return download(name, cache_dir=cache_dir, local_files_only=True, manifest=manifest)


def cache_status(name: str, cache_dir: str | os.PathLike | None = None, manifest=None) -> dict:
    """``hub.cache_status``, and for a converted original: its weights' ``path`` once recorded (or None), with
    ``verified`` False (every load hashes it against the record)."""
    entry = hub.load_manifest(manifest).entry(str(name))
    if entry.published or entry.upstream is None:
        return hub.cache_status(name, cache_dir, manifest)
    folder = cache_root(cache_dir) / entry.name
    recorded = (folder / RECORD_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()
    return {"path": str(folder / WEIGHTS_FILE) if recorded else None, "verified": False}


def _is_recorded(entry: ManifestEntry, folder: Path) -> bool:
    """Whether ``folder`` holds a conversion of the entry's upstream file that still matches its record; a record
    whose weights changed since raises ``ChecksumError``."""
    weights = folder / WEIGHTS_FILE
    try:
        record = json.loads((folder / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return False
    pinned = entry.upstream.sha256
    if not isinstance(record, dict) or (pinned is not None and record.get("source_sha256") != pinned):
        return False  # an older conversion, of a file the manifest no longer pins
    digest = sha256_file(weights) if weights.is_file() else "missing"
    if digest != record.get("sha256"):
        raise ChecksumError(
            f"{entry.name}: the converted file {weights} has sha256 {digest}, but {folder / RECORD_FILE} recorded "
            f"{record.get('sha256')} when it was converted: the cache was damaged since; delete {folder} or run "
            f"`uniseg-hub download {entry.name} --force` to fetch and convert it again",
            path=weights, expected=record.get("sha256"), actual=digest)
    return True


def _fetch_and_convert(entry: ManifestEntry, folder: Path, force: bool) -> Path:
    up = entry.upstream
    raw = folder / up.filename
    if force:
        for stale in [raw, *folder.glob(f"{up.filename}*.part"), folder / RECORD_FILE]:
            stale.unlink(missing_ok=True)
    size = "size unknown" if up.size is None else f"{up.size / 1e6:.1f} MB"
    licence = entry.license
    logger.warning("%s: fetching the original checkpoint %s (%s) from %s and converting it; licence: %s (%s, %s)",
                   entry.name, up.filename, size, up.url, licence.name,
                   "commercial use allowed" if licence.commercial_use else "non-commercial use only", licence.url)
    _fetch(entry, raw)
    try:
        weights = _convert(entry, raw, folder)
    finally:
        raw.unlink(missing_ok=True)  # trusted or not, only the conversion is kept
    return weights


def _fetch(entry: ManifestEntry, raw: Path) -> None:
    """Download the upstream file to ``raw`` with gdown (imported here: requests and bs4 cost time to import).

    gdown turns a Google Drive link into its download URL and answers Drive's "cannot scan this large file for
    viruses" confirmation page itself; other URLs are fetched as they are. That handling is gdown's and is not
    exercised by the tests, which serve the file from 127.0.0.1 (no Drive host). Partial bytes stay in
    ``raw``'s ``.part`` file, which the next call resumes (``resume=True``).
    """
    import gdown
    import requests
    from huggingface_hub import constants
    from huggingface_hub.utils import are_progress_bars_disabled

    up = entry.upstream
    raw.parent.mkdir(parents=True, exist_ok=True)
    quiet = constants.HF_HUB_DISABLE_PROGRESS_BARS or are_progress_bars_disabled()  # a progress bar as the Hub's
    try:
        gdown.download(up.url, str(raw), quiet=quiet, resume=True, timeout=60)
    except (gdown.exceptions.DownloadError, requests.exceptions.ChunkedEncodingError,
            requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
        if isinstance(e, gdown.exceptions.FileURLRetrievalError):
            raise DownloadError(f"{entry.name}: Google Drive did not hand out {up.url} ({_one_line(e)}); open the "
                                "link in a browser (too many downloads today locks a file for a while), or "
                                f"download it yourself and run `uniseg-hub convert {up.filename} ./{entry.name}`") \
                from e
        kept = sum(p.stat().st_size for p in raw.parent.glob(f"{up.filename}*.part"))
        raise IncompleteDownloadError(
            f"{entry.name}: downloading {up.url} failed ({_one_line(e)}); {kept} bytes are kept in {raw.parent} and "
            f"the next `uniseg-hub download {entry.name}` (or load) resumes from there; check the network and the "
            "proxy settings (HTTPS_PROXY, NO_PROXY)") from e
    except (requests.exceptions.RequestException, OSError) as e:
        raise DownloadError(f"{entry.name}: {up.url} could not be downloaded ({_one_line(e)}); check the link and "
                            "the network, or download it yourself and run "
                            f"`uniseg-hub convert {up.filename} ./{entry.name}`") from e


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _convert(entry: ManifestEntry, raw: Path, folder: Path) -> Path:
    """Verify ``raw`` (see the module docstring), convert it into ``folder`` and record the result."""
    import torch

    from .weights import convert_state_dict, read_official_checkpoint, save_folder

    up = entry.upstream
    digest = sha256_file(raw)

    def refuse(problem: str, cause: BaseException | None = None):
        raise UpstreamFileError(
            f"{entry.name}: the file downloaded from {up.url} {problem}, so it is not the checkpoint the manifest "
            f"describes; it was deleted. Run again if the transfer was damaged; if it keeps failing, download "
            f"{up.filename} yourself and run `uniseg-hub convert {up.filename} ./{entry.name}`",
            path=raw, expected=up.sha256, actual=digest) from cause

    size = raw.stat().st_size
    if up.size is not None and size != up.size:
        refuse(f"has {size} bytes instead of {up.size}")
    if up.sha256 is not None and digest != up.sha256:
        refuse(f"has sha256 {digest} instead of {up.sha256}")
    with open(raw, "rb") as f:
        head = f.read(512).lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        refuse("is an HTML page (a login, quota or error page of the host)")
    try:
        state = read_official_checkpoint(raw)
        if bad := [k for k, v in state.items() if not v.is_floating_point() or not torch.isfinite(v).all()]:
            raise IncompatibleCheckpointError(f"tensors that are not finite floating point: {', '.join(bad[:5])}")
        converted, config = convert_state_dict(state)
    except (UnisegHubError, ArithmeticError, LookupError, TypeError, ValueError, RuntimeError) as e:
        # whatever the checks of an untrusted file run into means that it is not the model
        refuse(f"was refused: {_one_line(e)}", e)
    if config != entry.architecture:
        refuse(f"holds another architecture ({config.to_dict()['config']})")
    if up.sha256 is None:
        logger.warning("%s: the upstream file is not pinned by a sha256 in the manifest; accepted because it is "
                       "exactly the %s architecture (%d tensors), and its sha256 is %s", entry.name,
                       config.architecture, len(state), digest)
    source = {"file": up.filename, "url": up.url, "sha256": digest, "format": up.format}
    save_folder(folder, converted, config, source=source, overwrite=True)
    weights = folder / WEIGHTS_FILE
    write_text_atomic(folder / RECORD_FILE, format_json(
        {"sha256": sha256_file(weights), "source_sha256": digest, "source_url": up.url}) + "\n")
    return weights
