"""Verified downloads from the Hugging Face Hub, and the cache.

``download`` fetches the file with ``huggingface_hub.hf_hub_download`` at the manifest's pinned commit and then
checks size and sha256 itself: the client only checks sizes, and returns cached files without any check. A cached
file at a pinned commit costs no request at all, so a warm cache works offline as it is; ``HF_ENDPOINT``,
``HF_HOME``/``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, ``HF_TOKEN`` and the proxy variables work as huggingface_hub
documents them.

A verified file gets a marker (its path, size, mtime and inode) beside the cached repository, so loads do not hash
it again until the file changes; ``verify`` always hashes. Nothing here imports torch.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
from huggingface_hub import errors as hf_errors
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import WeakFileLock
from huggingface_hub.utils.sha import git_hash

from .. import __version__
from ..config import CONFIG_FILE, WEIGHTS_FILE, ManifestEntry
from ..errors import (
    ChecksumError,
    DownloadError,
    IncompleteDownloadError,
    NotAvailableOfflineError,
)
from ..files import sha256_file, write_text_atomic
from .manifest import LIBRARY_NAME, Manifest, load_manifest

logger = logging.getLogger(__name__)


# The error the HTTP client raises when a body download keeps failing after huggingface_hub's own retries
# (httpx2.HTTPError in huggingface_hub 2.x, httpx.HTTPError in 1.x); huggingface_hub does not wrap it.
_TRANSPORT_ERROR = hf_errors.HTTPError


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


@dataclass(frozen=True)
class _Target:
    """One file to fetch and check, with what the messages need."""

    manifest: Manifest
    entry: ManifestEntry
    revision: str
    cache_dir: Path
    local_files_only: bool
    token: str | bool | None = None

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def repo_id(self) -> str:
        return self.entry.repo_id

    @property
    def filename(self) -> str:
        return self.entry.filename

    @property
    def pinned(self) -> bool:
        """Only the manifest's own commit is held to its sha256."""
        return self.revision == self.entry.revision

    @property
    def endpoint(self) -> str:
        return self.manifest.endpoint or constants.ENDPOINT

    @property
    def offline_reason(self) -> str | None:
        return offline_reason(self.local_files_only)

    @property
    def repo_folder(self) -> Path:
        return self.cache_dir / repo_folder_name(repo_id=self.repo_id, repo_type="model")

    @property
    def label(self) -> str:
        return f"{self.name} ({self.repo_id}@{self.revision[:12]}/{self.filename})"


def offline_reason(local_files_only: bool) -> str | None:
    """Why the network is off (read at call time: tests and users may switch it), or None."""
    if local_files_only:
        return "local_files_only=True (--local-files-only)"
    return "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else None


@contextmanager
def cache_lock(lock: Path):
    """Hold the inter-process file lock ``lock`` (one writer per cached file); a read-only cache is used without."""
    with ExitStack() as stack:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(WeakFileLock(lock))
        except OSError as e:
            logger.debug("no lock at %s (%s)", lock, e)
        yield


def _target(name, revision, cache_dir, local_files_only, manifest, token=None) -> _Target:
    m = load_manifest(manifest)
    entry = m.published_entry(str(name))
    revision = entry.revision if revision is None else str(revision)
    return _Target(m, entry, revision, cache_folder(cache_dir), bool(local_files_only), token)


def _caused_by(error: BaseException, *classes: type) -> bool:
    """Whether ``error`` or what it wraps is one of ``classes`` (huggingface_hub often wraps the real cause)."""
    return any(isinstance(e, classes) for e in (error, error.__cause__, error.__context__))


def _explain(t: _Target, error: BaseException) -> DownloadError:
    """Our error for a huggingface_hub failure; the client often wraps the real cause, so look at the chain."""
    entry_fix = f"check the entry in the manifest {t.manifest.path} and HF_ENDPOINT"
    if _caused_by(error, hf_errors.GatedRepoError):
        return DownloadError(f"{t.repo_id} (model {t.name}) is gated on {t.endpoint}: accept its terms on the "
                             "repository page, then log in with `hf auth login` or set HF_TOKEN")
    if _caused_by(error, hf_errors.RepositoryNotFoundError):
        return DownloadError(f"repository {t.repo_id} (model {t.name}) was not found on {t.endpoint}: {entry_fix}; "
                             "a private repository also needs a token (`hf auth login` or HF_TOKEN)")
    if _caused_by(error, hf_errors.RevisionNotFoundError):
        return DownloadError(f"revision {t.revision} of {t.repo_id} (model {t.name}) was not found on "
                             f"{t.endpoint}: the repository has no such commit; {entry_fix}, or pass another "
                             "revision")
    if _caused_by(error, hf_errors.RemoteEntryNotFoundError):
        return DownloadError(f"file {t.filename} is not in {t.repo_id} at revision {t.revision} (model {t.name}) "
                             f"on {t.endpoint}: {entry_fix}")
    if isinstance(error, hf_errors.LocalEntryNotFoundError):
        if t.offline_reason:
            return NotAvailableOfflineError(
                f"{t.name} is not in the cache {t.cache_dir} and downloads are off ({t.offline_reason}): fetch it "
                f"with `uniseg-hub download {t.name}` on a machine with network access (same HF_HUB_CACHE or "
                "--cache-dir) and copy the cache folder here, or allow downloads")
        return DownloadError(f"could not download {t.label} from {t.endpoint}, and it is not in the cache "
                             f"{t.cache_dir}: {_one_line(error.__cause__ or error)}; check the network connection, "
                             "HF_ENDPOINT and the proxy settings (HTTPS_PROXY, NO_PROXY), or fetch it elsewhere with "
                             f"`uniseg-hub download {t.name}`, copy the cache here and set HF_HUB_OFFLINE=1")
    if isinstance(error, hf_errors.HfHubHTTPError):
        return DownloadError(f"the Hub at {t.endpoint} refused {t.label}: {_one_line(error)}")
    return IncompleteDownloadError(f"downloading {t.label} from {t.endpoint} failed: "
                                   f"{_one_line(error.__cause__ or error)}; check the network connection, the "
                                   f"proxy settings and the free space in {t.cache_dir}")


def _fetch(t: _Target, force: bool) -> Path:
    """The cached file (downloading it if needed) via huggingface_hub, errors explained."""
    try:
        return Path(hf_hub_download(
            t.repo_id, t.filename, revision=t.revision, cache_dir=t.cache_dir, local_files_only=t.local_files_only,
            force_download=force, token=t.token, endpoint=t.manifest.endpoint, library_name=LIBRARY_NAME,
            library_version=__version__,
        ))
    except (OSError, ValueError, hf_errors.EntryNotFoundError, _TRANSPORT_ERROR) as e:
        raise _explain(t, e) from e


def _stamp(t: _Target, path: Path) -> dict:
    real = path.resolve()
    stat = real.stat()
    return {"path": str(real), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino,
            "sha256": t.entry.sha256}


def _marker(t: _Target) -> Path:
    return t.repo_folder / ".uniseg_hub" / f"{t.entry.sha256}.verified.json"


def _is_marked(t: _Target, path: Path) -> bool:
    try:
        return json.loads(_marker(t).read_text()) == _stamp(t, path)
    except (OSError, ValueError):
        return False


def _mark(t: _Target, path: Path) -> None:
    """Record that ``path`` as it is now has the manifest's sha256 (atomically; a read-only cache stays as it is)."""
    marker = _marker(t)
    try:
        write_text_atomic(marker, json.dumps(_stamp(t, path)))
    except OSError as e:
        logger.debug("could not write %s (%s); the file will be hashed again on the next load", marker, e)


def _unmark(t: _Target) -> None:
    try:
        _marker(t).unlink(missing_ok=True)
    except OSError as e:
        logger.debug("could not remove %s: %s", _marker(t), e)


def _discard(t: _Target, path: Path) -> None:
    """Remove a bad file from the cache: the snapshot entry and the blob it points to."""
    _unmark(t)
    for p in dict.fromkeys([path, path.resolve()]):
        try:
            p.unlink(missing_ok=True)
        except OSError as e:
            raise ChecksumError(f"{t.label}: the cached file {p} is corrupt and could not be removed ({e}); delete "
                                "it by hand", path=p) from e


def _verify_lock(t: _Target):
    """Serialise the checks of one file across processes (so four concurrent loads hash it once)."""
    return cache_lock(t.cache_dir / ".locks" / t.repo_folder.name / f"{t.entry.sha256}.uniseg_hub.lock")


def _check(t: _Target, path: Path) -> tuple[str | None, str | None]:
    """(what is wrong or None, the sha256 if it was computed)."""
    size = path.stat().st_size
    if size != t.entry.size:
        return f"{size} bytes instead of {t.entry.size}", None
    digest = sha256_file(path)
    if digest != t.entry.sha256:
        return f"sha256 {digest} instead of {t.entry.sha256}", digest
    return None, digest


def download(name: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
             local_files_only: bool = False, force: bool = False, manifest=None,
             token: str | bool | None = None) -> Path:
    """The verified local file of the manifest model ``name``, downloaded from the Hub if it is not cached.

    Args:
        name: a model of the manifest (``list_models()``).
        revision: another commit, branch or tag than the pinned one; its file is hashed and a warning says when it
            is not the manifest's checkpoint (it is then returned unverified, as asked).
        cache_dir: the huggingface_hub cache to use (default ``HF_HUB_CACHE``, i.e. ``$HF_HOME/hub``).
        local_files_only: never use the network (like ``HF_HUB_OFFLINE=1``).
        force: download again even if cached.
        manifest: another manifest (path, dict or ``Manifest``) than ``UNISEG_HUB_MANIFEST`` or the shipped one.
        token: the Hub token (default: ``HF_TOKEN`` or the one stored by ``hf auth login``), as huggingface_hub
            takes it.

    A wrong size or sha256 removes the file from the cache and fetches it once more; ``ChecksumError`` if it is
    still wrong (or if there is no network to fetch it again). Unknown names raise ``UnknownModelError``, entries
    without a Hub copy ``NotPublishedError``, a missing file offline ``NotAvailableOfflineError``, other Hub and
    network failures ``DownloadError``; each keeps huggingface_hub's exception as its cause.
    """
    t = _target(name, revision, cache_dir, local_files_only, manifest, token)
    if force and t.offline_reason:
        raise NotAvailableOfflineError(f"force=True downloads {t.name} again, but downloads are off "
                                       f"({t.offline_reason}); allow downloads or drop force")
    for attempt in (1, 2):
        try:
            path = _fetch(t, force=force or attempt == 2)
        except IncompleteDownloadError as e:
            if attempt == 2:
                raise
            logger.warning("%s; fetching it once more", e)
            continue
        with _verify_lock(t):
            if _is_marked(t, path):
                return path
            problem, _ = _check(t, path)
            if problem is None:
                _mark(t, path)
                return path
            if not t.pinned:
                warnings.warn(f"{t.name}: revision {t.revision} is not the manifest's pinned commit "
                              f"{t.entry.revision} and its {t.filename} has {problem}, so it is not the checkpoint "
                              "the manifest describes; returned unverified, as asked", stacklevel=2)
                return path
            _discard(t, path)
            if t.offline_reason:
                raise ChecksumError(
                    f"{t.label}: the cached file {path} has {problem}; it was removed from the cache. Downloads are "
                    f"off ({t.offline_reason}): fetch it again with `uniseg-hub download {t.name}` where the "
                    "network is available, or copy an intact cache", path=path, expected=t.entry.sha256)
            if attempt == 2:
                raise ChecksumError(
                    f"{t.label}: the file served by {t.endpoint} has {problem}, again after fetching it a second "
                    "time; it was removed from the cache. Something between you and the Hub alters the file (check "
                    f"HF_ENDPOINT, mirrors and proxies), or the manifest entry ({t.manifest.path}) does not match the "
                    "repository", path=path, expected=t.entry.sha256)
            logger.warning("%s: the file %s has %s; removed it, fetching it once more", t.label, path, problem)
    raise AssertionError("unreachable")


REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
REPO_FILES = (CONFIG_FILE, WEIGHTS_FILE)
"""What a uniseg-hub repository on the Hub holds at its top level (``uniseg-hub publish`` writes them)."""


def parse_repo_id(src: str) -> tuple[str, str | None] | None:
    """(repository id, revision or None) when ``src`` is written ``ORG/NAME`` or ``ORG/NAME@REVISION``, else None."""
    repo_id, at, revision = src.partition("@")
    if not REPO_ID.fullmatch(repo_id) or (at and not revision) or repo_id.endswith((".", "-")):
        return None
    return repo_id, revision or None


def download_repo(repo_id: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                  local_files_only: bool = False, weights: bool = True, force: bool = False,
                  token: str | bool | None = None) -> Path:
    """The snapshot folder holding ``config.json`` (and ``model.safetensors`` when ``weights``) of a Hub repository
    named directly, as ``transformers`` and ``timm`` take ``ORG/NAME``: fetched with ``hf_hub_download`` into the
    huggingface_hub cache (a cached revision needs no request), ``revision`` a commit, branch or tag (default main);
    ``force`` downloads again even if cached, ``token`` as for ``download``.

    Nothing pins such a repository's content (a manifest entry does); the commit it resolved to is in the folder's
    path, and the weights are checked against the sha256 the Hub gave for them (``ChecksumError``). Errors name
    the repository and the fix: ``DownloadError`` (no such repository, revision or file, refused, network),
    ``NotAvailableOfflineError`` (offline and not cached).
    """
    offline = offline_reason(local_files_only)
    endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or constants.ENDPOINT  # read now, as offline is
    label = f"{repo_id}@{revision}" if revision else repo_id
    if force and offline:
        raise NotAvailableOfflineError(f"force=True downloads {label} again, but downloads are off ({offline}); "
                                       "allow downloads or drop force")
    paths = []
    try:
        for filename in REPO_FILES[: 2 if weights else 1]:
            paths.append(Path(hf_hub_download(
                repo_id, filename, revision=revision, cache_dir=cache_dir, local_files_only=offline is not None,
                force_download=force, token=token, endpoint=endpoint, library_name=LIBRARY_NAME,
                library_version=__version__)))
    except (OSError, ValueError, hf_errors.EntryNotFoundError, _TRANSPORT_ERROR) as e:
        if _caused_by(e, hf_errors.RepositoryNotFoundError, hf_errors.GatedRepoError):
            raise DownloadError(f"no repository {repo_id} on {endpoint} that this account can read: check the id "
                                "(ORG/NAME), log in for a private or gated one (`hf auth login` or HF_TOKEN), or "
                                "give a local folder") from e
        if _caused_by(e, hf_errors.RevisionNotFoundError):
            raise DownloadError(f"{repo_id} on {endpoint} has no revision {revision!r}; give a commit, branch or "
                                "tag of the repository") from e
        if _caused_by(e, hf_errors.RemoteEntryNotFoundError):
            raise DownloadError(f"{label} on {endpoint} has no {filename}: it is not a repository written by "
                                "`uniseg-hub publish` (config.json + model.safetensors)") from e
        if isinstance(e, hf_errors.LocalEntryNotFoundError) and offline:
            raise NotAvailableOfflineError(f"{label} is not in the huggingface_hub cache and downloads are off "
                                           f"({offline}); load it once with network access, or allow downloads") \
                from e
        raise DownloadError(f"could not fetch {label} from {endpoint}: {_one_line(e.__cause__ or e)}; check the "
                            "network, HF_ENDPOINT and the proxy settings (HTTPS_PROXY, NO_PROXY)") from e
    for path in paths:
        _check_blob(path, label)
    logger.info("%s: not pinned by the manifest; loaded the repository at commit %s", label, path.parent.name)
    return path.parent


def _check_blob(path: Path, label: str) -> None:
    """A file of a repository named directly, checked against the hash the Hub gave for it: the huggingface_hub
    cache names each blob after it (``blobs/<sha256>`` for a Git LFS file such as the weights, ``blobs/<git blob
    sha1>`` for a small file such as config.json), so a transfer or a cache corrupted afterwards is caught on every
    load without a request."""
    blob = Path(os.path.realpath(path))
    if re.fullmatch(r"[0-9a-f]{64}", blob.name):
        algorithm, digest = "sha256", sha256_file(blob)
    elif re.fullmatch(r"[0-9a-f]{40}", blob.name):
        data = blob.read_bytes()  # small files only: Git LFS holds anything large
        algorithm, digest = "git blob sha1", git_hash(data)
    else:
        return  # not a blob of the huggingface_hub cache: nothing to check against
    if digest != blob.name:
        raise ChecksumError(f"{label}: the cached {path.name} has {algorithm} {digest}, but the Hub gave {blob.name}; "
                            "fetch a fresh copy: load it with force_download=True",
                            path=blob, expected=blob.name, actual=digest)


def verify(name: str, cache_dir: str | os.PathLike | None = None, manifest=None) -> Path:
    """Hash the cached file of ``name`` (no network, ignoring earlier verification); its path if it is intact.

    ``ChecksumError`` if the size or sha256 differs (``uniseg-hub download NAME --force`` fetches a fresh copy),
    ``NotAvailableOfflineError`` if it is not cached.
    """
    t = _target(name, None, cache_dir, True, manifest)
    try:
        path = _fetch(t, force=False)
    except NotAvailableOfflineError as e:
        raise NotAvailableOfflineError(f"{t.name} is not in the cache {t.cache_dir}; fetch it with "
                                       f"`uniseg-hub download {t.name}`") from e.__cause__
    with _verify_lock(t):
        problem, digest = _check(t, path)
        if problem is not None:
            _unmark(t)
            raise ChecksumError(f"{t.label}: the cached file {path} has {problem}; fetch a fresh copy with "
                                f"`uniseg-hub download {t.name} --force`", path=path, expected=t.entry.sha256,
                                actual=digest)
        _mark(t, path)
    return path


def cache_status(name: str, cache_dir: str | os.PathLike | None = None, manifest=None) -> dict:
    """Where ``name`` is cached (``path``, or None) and whether it was verified since it last changed; no network,
    no hashing."""
    m = load_manifest(manifest)
    if not m.entry(str(name)).published:
        return {"path": None, "verified": False}
    t = _target(name, None, cache_dir, True, m)
    found = try_to_load_from_cache(t.repo_id, t.filename, cache_dir=t.cache_dir, revision=t.revision)
    if not isinstance(found, str):
        return {"path": None, "verified": False}
    return {"path": found, "verified": _is_marked(t, Path(found))}


def cache_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """The huggingface_hub cache folder that downloads go to (``HF_HUB_CACHE``, by default ``$HF_HOME/hub``)."""
    return Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE).expanduser().resolve()
