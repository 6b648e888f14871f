"""Pretrained weights by name: the manifest, verified downloads from the Hugging Face Hub, and the cache.

The manifest (``weights_manifest.json``, shipped inside the package; ``UNISEG_HUB_MANIFEST=PATH`` or ``manifest=``
replace it) pins every checkpoint to a repository, a commit, a file, its size and its sha256. ``download`` fetches
the file with ``huggingface_hub.hf_hub_download`` at that commit and then checks size and sha256 itself: the client
only checks sizes, and returns cached files without any check. A cached file at a pinned commit costs no request at
all, so a warm cache works offline as it is; ``HF_ENDPOINT``, ``HF_HOME``/``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``,
``HF_TOKEN`` and the proxy variables work as huggingface_hub documents them.

A verified file gets a marker (its path, size, mtime and inode) beside the cached repository, so loads do not hash
it again until the file changes; ``verify`` always hashes.

Nothing here imports torch, so the command line's ``list``, ``info``, ``download``, ``verify`` and ``path`` start
fast.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
from huggingface_hub import errors as hf_errors
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import WeakFileLock, validate_repo_id

from . import __version__
from .errors import (
    ChecksumError,
    DownloadError,
    ManifestError,
    NotAvailableOfflineError,
    NotPublishedError,
    UnknownModelError,
)
from .files import sha256_file
from .tasks import CT_WINDOW, TASKS, ZSCORE_EPS

logger = logging.getLogger(__name__)

MANIFEST_FILE = "weights_manifest.json"
MANIFEST_ENV = "UNISEG_HUB_MANIFEST"
SCHEMA_VERSION = 1
LIBRARY_NAME = "uniseg-hub"
ARCHITECTURE_NAMES = ("UniSeg", "UniSegBackbone")
"""What ``weights.build_network`` builds; repeated here so that reading a manifest does not import torch."""

# The error the HTTP client raises when a body download keeps failing after huggingface_hub's own retries
# (httpx2.HTTPError in huggingface_hub 2.x, httpx.HTTPError in 1.x); huggingface_hub does not wrap it.
_TRANSPORT_ERROR = hf_errors.HTTPError

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
_SHA1 = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_URL = re.compile(r"https?://\S+")
_PINNED = ("repo_id", "revision", "sha256", "size")
_REQUIRED = ("name", "description", "published", *_PINNED, "filename", "format", "license", "architecture",
             "preprocessing", "source")
_OPTIONAL = ("notes",)


# --------------------------------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class Manifest:
    """A validated manifest: where it came from, its entries by name, and an optional Hub endpoint (a mirror)."""

    path: str
    models: dict
    endpoint: str | None = None

    def entry(self, name: str) -> dict:
        """The entry called ``name``; ``UnknownModelError`` listing the names otherwise."""
        if name not in self.models:
            raise UnknownModelError(
                f"unknown model {name!r}; the manifest {self.path} lists: {', '.join(self.models) or 'nothing'} "
                "(see `uniseg-hub list`); a converted folder is loaded by its path instead"
            )
        return self.models[name]

    def published_entry(self, name: str) -> dict:
        """The entry called ``name`` if it has a copy on the Hub; ``NotPublishedError`` with the ways forward."""
        entry = self.entry(name)
        if not entry["published"]:
            source = entry["source"]
            raise NotPublishedError(
                f"{name} is not published on the Hugging Face Hub yet: no converted copy exists there, so it cannot "
                f"be downloaded by name (the original {source.get('original_file') or 'checkpoint'} is at "
                f"{source['original_url']}). Two ways forward: convert the original file locally with "
                f"`uniseg-hub convert {source.get('original_file') or 'CHECKPOINT'} ./{name}` and load the folder "
                f"(load_model('./{name}'), or weights_path='./{name}/model.safetensors' to keep this entry's "
                f"preprocessing); or publish it with `uniseg-hub publish ./{name} --repo-id ORG/{name} --name {name}` "
                f"and put the entry it prints into the manifest ({self.path}, or a copy named by {MANIFEST_ENV})"
            )
        return entry


def _no_duplicate_keys(pairs):
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"duplicate key(s) {', '.join(map(repr, duplicates))} in one object")
    return dict(pairs)


def _is_int(value, minimum: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _check_architecture(arch, fail) -> None:
    if not isinstance(arch, dict) or set(arch) != {"architecture", "config"}:
        fail("architecture must be {\"architecture\": NAME, \"config\": {...}}, as `uniseg-hub convert` writes it "
             "to config.json")
    if arch["architecture"] not in ARCHITECTURE_NAMES:
        fail(f"architecture {arch['architecture']!r} is not one of {', '.join(ARCHITECTURE_NAMES)}")
    config = arch["config"]
    if not isinstance(config, dict):
        fail("architecture.config must be an object")
    for key in ("in_channels", "features", "kernel_sizes", "strides"):
        if key not in config:
            fail(f"architecture.config has no {key!r}")
    if not config["in_channels"] or not all(_is_int(c) for c in config["in_channels"]):
        fail("architecture.config.in_channels must list the stems' channel counts, e.g. [1, 2, 4]")
    stages = config["features"]
    if not stages or not all(_is_int(f) for f in stages):
        fail("architecture.config.features must list positive feature counts, one per stage")
    for key in ("kernel_sizes", "strides"):
        triples = config[key]
        if not isinstance(triples, list) or len(triples) != len(stages) or not all(
                isinstance(t, list) and len(t) == 3 and all(_is_int(v) for v in t) for t in triples):
            fail(f"architecture.config.{key} must hold one [x, y, z] triple of positive integers per stage")


def validate_entry(entry, where: str = "entry", *, require_revision: bool = True) -> dict:
    """Check one manifest entry; returns it, or raises ``ManifestError`` naming the field and the fix.

    ``require_revision=False`` accepts a published entry whose commit is not known yet (``publish --dry-run``).
    """
    def fail(message: str):
        raise ManifestError(f"{where}: {message}")

    if not isinstance(entry, dict):
        fail("an entry must be a JSON object")
    missing = [k for k in _REQUIRED if k not in entry]
    unknown = [k for k in entry if k not in _REQUIRED + _OPTIONAL]
    if missing:
        fail(f"missing field(s) {', '.join(missing)}")
    if unknown:
        fail(f"unknown field(s) {', '.join(unknown)}; the fields are {', '.join(_REQUIRED + _OPTIONAL)}")
    name = entry["name"]
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        fail(f"name {name!r} must be lower-case letters, digits, '.', '_' or '-', starting with a letter or digit")
    where = f"{where} ({name})"
    if not isinstance(entry["description"], str) or not entry["description"].strip():
        fail("description must be a non-empty string")
    if not isinstance(entry["published"], bool):
        fail("published must be true or false")
    if entry["published"]:
        repo_id = entry["repo_id"]
        try:
            validate_repo_id(repo_id)
        except (ValueError, TypeError) as e:
            fail(f"repo_id {repo_id!r} is not a Hub repository id ({e})")
        if "/" not in repo_id:
            fail(f"repo_id {repo_id!r} must be ORG/NAME")
        revision = entry["revision"]
        if not (revision is None and not require_revision) and not (
                isinstance(revision, str) and _SHA1.fullmatch(revision)):
            fail(f"revision {revision!r} must be a 40-hex commit sha (never a branch or tag): the commit that "
                 "`uniseg-hub publish` printed")
        if not isinstance(entry["sha256"], str) or not _SHA256.fullmatch(entry["sha256"]):
            fail(f"sha256 {entry['sha256']!r} must be 64 lower-case hex digits")
        if not _is_int(entry["size"]):
            fail(f"size {entry['size']!r} must be the file size in bytes")
    else:
        invented = [k for k in _PINNED if entry[k] is not None]
        if invented:
            fail(f"an unpublished entry has no {', '.join(invented)}: leave them null until `uniseg-hub publish` "
                 "prints the real values, and set published to true then")
    filename = entry["filename"]
    if not isinstance(filename, str) or not filename.endswith(".safetensors") or filename.startswith("/") \
            or ".." in filename.split("/"):
        fail(f"filename {filename!r} must be a relative path to a .safetensors file in the repository")
    if entry["format"] != "safetensors":
        fail(f"format {entry['format']!r} is not supported; uniseg-hub loads safetensors only")
    license_ = entry["license"]
    if not isinstance(license_, dict) or not all(isinstance(license_.get(k), str) for k in ("id", "name", "url")) \
            or not isinstance(license_.get("commercial_use"), bool) or not _URL.fullmatch(license_["url"]):
        fail("license must hold id, name, url (http/https) and commercial_use (true or false)")
    _check_architecture(entry["architecture"], fail)
    if not isinstance(entry["preprocessing"], dict) or not isinstance(entry["preprocessing"].get("axis_order"), str):
        fail("preprocessing must be an object with at least axis_order")
    source = entry["source"]
    if not isinstance(source, dict) or not all(isinstance(source.get(k), str) for k in ("paper", "code")) \
            or not (isinstance(source.get("code_commit"), str) and _SHA1.fullmatch(source["code_commit"])):
        fail("source must hold paper, code and code_commit (the official code's 40-hex commit)")
    if source.get("original_sha256") is not None and not _SHA256.fullmatch(str(source["original_sha256"])):
        fail("source.original_sha256 must be 64 lower-case hex digits or null (unknown)")
    if not entry["published"] and not (isinstance(source.get("original_url"), str)
                                       and _URL.fullmatch(source["original_url"])):
        fail("an unpublished entry must say where the original is: source.original_url")
    if "notes" in entry and not isinstance(entry["notes"], str):
        fail("notes must be a string")
    return entry


def parse_manifest(data, where: str = "manifest") -> Manifest:
    """Validate a decoded manifest (``{"schema_version": 1, "models": [...]}``) and index it by name."""
    def fail(message: str):
        raise ManifestError(f"weights manifest {where}: {message}")

    if not isinstance(data, Mapping):
        fail("the top level must be an object with schema_version and models")
    unknown = [k for k in data if k not in ("schema_version", "description", "endpoint", "models")]
    if unknown:
        fail(f"unknown top-level field(s) {', '.join(unknown)}")
    if data.get("schema_version") != SCHEMA_VERSION:
        fail(f"schema_version {data.get('schema_version')!r} is not {SCHEMA_VERSION}; this uniseg-hub "
             f"{__version__} reads schema {SCHEMA_VERSION} (upgrade uniseg-hub for newer manifests)")
    endpoint = data.get("endpoint")
    if endpoint is not None and not (isinstance(endpoint, str) and _URL.fullmatch(endpoint)):
        fail(f"endpoint {endpoint!r} must be an http(s) URL of a Hub (or mirror), or absent for HF_ENDPOINT")
    entries = data.get("models")
    if not isinstance(entries, list):
        fail("models must be a list of entries")
    models = {}
    for i, entry in enumerate(entries):
        validate_entry(entry, f"weights manifest {where}: models[{i}]")
        if entry["name"] in models:
            fail(f"models[{i}]: the name {entry['name']!r} is used twice; names must be unique")
        models[entry["name"]] = entry
    return Manifest(where, models, endpoint.rstrip("/") if endpoint else None)


def _read_manifest(path, origin: str = "") -> Manifest:
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ManifestError(f"cannot read the weights manifest {path}{origin}: {e.strerror or e}") from e
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except ValueError as e:
        raise ManifestError(f"weights manifest {path}{origin} is not valid JSON: {e}") from e
    return parse_manifest(data, f"{path}{origin}")


def packaged_manifest() -> Manifest:
    """The manifest shipped inside the package (whatever ``UNISEG_HUB_MANIFEST`` says)."""
    with resources.as_file(resources.files(__package__).joinpath(MANIFEST_FILE)) as path:
        return _read_manifest(path)


def load_manifest(manifest: Manifest | Mapping | str | os.PathLike | None = None) -> Manifest:
    """The manifest to use: ``manifest`` (a path, decoded JSON or a ``Manifest``), else the file named by
    ``UNISEG_HUB_MANIFEST``, else the one shipped in the package. Validated on every read."""
    if isinstance(manifest, Manifest):
        return manifest
    if isinstance(manifest, Mapping):
        return parse_manifest(manifest, "(given as a dict)")
    if manifest is not None:
        return _read_manifest(manifest)
    if os.environ.get(MANIFEST_ENV):
        return _read_manifest(os.environ[MANIFEST_ENV], f" (from {MANIFEST_ENV})")
    return packaged_manifest()


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


def list_models(manifest=None) -> list[str]:
    """Names of the manifest's models, published or not (``model_info`` says which)."""
    return list(load_manifest(manifest).models)


def model_info(name: str, manifest=None) -> dict:
    """A copy of the manifest entry of ``name``: repository, commit, sha256, size, license (``commercial_use``),
    architecture, preprocessing (patch size, spacing per task, normalisation, axis order) and provenance."""
    return copy.deepcopy(load_manifest(manifest).entry(str(name)))


def official_preprocessing(patch_size) -> dict:
    """The preprocessing block of the official 11-task model, written from ``uniseg_hub.tasks``."""
    low, high = CT_WINDOW
    return {
        "axis_order": "MONAI (C, x, y, z); the official nnU-Net code works in (z, y, x)",
        "orientation": "none: the official model saw voxel arrays as stored, without reorientation",
        "patch_size": list(patch_size),
        "normalization": {
            "ct_window": f"clip to [{low:g}, {high:g}] HU, then (x + {-low:g}) / {high - low:g}",
            "zscore": f"per image: (x - mean) / (std + {ZSCORE_EPS:g}); with nonzero_mask over the non-zero voxels "
                      "only, zero outside",
        },
        "tasks": {t.name: {
            "id": t.id, "group": t.group, "channels": list(t.channels), "normalization": list(t.normalization),
            "nonzero_mask": t.nonzero_mask, "spacing": list(t.spacing),
            "labels": {str(k): v for k, v in t.label_names.items()},
        } for t in TASKS},
    }


# --------------------------------------------------------------------------------------------------- downloads


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


class _IncompleteDownload(DownloadError):
    """The transfer ended early or with the wrong size; worth one more try."""


@dataclass(frozen=True)
class _Target:
    """One file to fetch and check, with what the messages need."""

    manifest: Manifest
    entry: dict
    revision: str
    cache_dir: Path
    local_files_only: bool

    @property
    def name(self) -> str:
        return self.entry["name"]

    @property
    def repo_id(self) -> str:
        return self.entry["repo_id"]

    @property
    def filename(self) -> str:
        return self.entry["filename"]

    @property
    def pinned(self) -> bool:
        """Only the manifest's own commit is held to its sha256."""
        return self.revision == self.entry["revision"]

    @property
    def endpoint(self) -> str:
        return self.manifest.endpoint or constants.ENDPOINT

    @property
    def offline_reason(self) -> str | None:
        """Why the network is off (read at call time: tests and users may switch it), or None."""
        if self.local_files_only:
            return "local_files_only=True (--local-files-only)"
        return "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else None

    @property
    def repo_folder(self) -> Path:
        return self.cache_dir / repo_folder_name(repo_id=self.repo_id, repo_type="model")

    @property
    def label(self) -> str:
        return f"{self.name} ({self.repo_id}@{self.revision[:12]}/{self.filename})"


def _target(name, revision, cache_dir, local_files_only, manifest) -> _Target:
    m = load_manifest(manifest)
    entry = m.published_entry(str(name))
    revision = entry["revision"] if revision is None else str(revision)
    return _Target(m, entry, revision, cache_folder(cache_dir), bool(local_files_only))


def _explain(t: _Target, error: BaseException) -> DownloadError:
    """Our error for a huggingface_hub failure; the client often wraps the real cause, so look at the chain."""
    chain = [error, error.__cause__, error.__context__]

    def caused_by(cls) -> bool:
        return any(isinstance(e, cls) for e in chain)

    entry_fix = f"check the entry in the manifest {t.manifest.path} and HF_ENDPOINT"
    if caused_by(hf_errors.GatedRepoError):
        return DownloadError(f"{t.repo_id} (model {t.name}) is gated on {t.endpoint}: accept its terms on the "
                             "repository page, then log in with `hf auth login` or set HF_TOKEN")
    if caused_by(hf_errors.RepositoryNotFoundError):
        return DownloadError(f"repository {t.repo_id} (model {t.name}) was not found on {t.endpoint}: {entry_fix}; "
                             "a private repository also needs a token (`hf auth login` or HF_TOKEN)")
    if caused_by(hf_errors.RevisionNotFoundError):
        return DownloadError(f"revision {t.revision} of {t.repo_id} (model {t.name}) was not found on "
                             f"{t.endpoint}: the repository has no such commit; {entry_fix}, or pass another "
                             "revision")
    if caused_by(hf_errors.RemoteEntryNotFoundError):
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
    return _IncompleteDownload(f"downloading {t.label} from {t.endpoint} failed: "
                               f"{_one_line(error.__cause__ or error)}; check the network connection, the proxy "
                               f"settings and the free space in {t.cache_dir}")


def _fetch(t: _Target, force: bool) -> Path:
    """The cached file (downloading it if needed) via huggingface_hub, errors explained."""
    try:
        return Path(hf_hub_download(
            t.repo_id, t.filename, revision=t.revision, cache_dir=t.cache_dir, local_files_only=t.local_files_only,
            force_download=force, endpoint=t.manifest.endpoint, library_name=LIBRARY_NAME,
            library_version=__version__,
        ))
    except (OSError, ValueError, hf_errors.EntryNotFoundError, _TRANSPORT_ERROR) as e:
        raise _explain(t, e) from e


def _stamp(t: _Target, path: Path) -> dict:
    real = path.resolve()
    stat = real.stat()
    return {"path": str(real), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino,
            "sha256": t.entry["sha256"]}


def _marker(t: _Target) -> Path:
    return t.repo_folder / ".uniseg_hub" / f"{t.entry['sha256']}.verified.json"


def _is_marked(t: _Target, path: Path) -> bool:
    try:
        return json.loads(_marker(t).read_text()) == _stamp(t, path)
    except (OSError, ValueError):
        return False


def _mark(t: _Target, path: Path) -> None:
    """Record that ``path`` as it is now has the manifest's sha256 (atomically; a read-only cache stays as it is)."""
    marker = _marker(t)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=marker.parent, prefix=".marker.", suffix=".tmp")
    except OSError as e:
        logger.debug("could not write %s (%s); the file will be hashed again on the next load", marker, e)
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_stamp(t, path), f)
        os.replace(tmp, marker)
    except OSError as e:
        logger.debug("could not write %s (%s); the file will be hashed again on the next load", marker, e)
    finally:
        Path(tmp).unlink(missing_ok=True)


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


@contextmanager
def _verify_lock(t: _Target):
    """Serialise the checks of one file across processes (so four concurrent loads hash it once)."""
    lock = t.cache_dir / ".locks" / t.repo_folder.name / f"{t.entry['sha256']}.uniseg_hub.lock"
    with ExitStack() as stack:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(WeakFileLock(lock))
        except OSError as e:  # a read-only cache: check without the lock
            logger.debug("no lock at %s (%s)", lock, e)
        yield


def _check(t: _Target, path: Path) -> tuple[str | None, str | None]:
    """(what is wrong or None, the sha256 if it was computed)."""
    size = path.stat().st_size
    if size != t.entry["size"]:
        return f"{size} bytes instead of {t.entry['size']}", None
    digest = sha256_file(path)
    if digest != t.entry["sha256"]:
        return f"sha256 {digest} instead of {t.entry['sha256']}", digest
    return None, digest


def download(name: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
             local_files_only: bool = False, force: bool = False, manifest=None) -> Path:
    """The verified local file of the manifest model ``name``, downloaded from the Hub if it is not cached.

    Args:
        name: a model of the manifest (``list_models()``).
        revision: another commit, branch or tag than the pinned one; its file is hashed and a warning says when it
            is not the manifest's checkpoint (it is then returned unverified, as asked).
        cache_dir: the huggingface_hub cache to use (default ``HF_HUB_CACHE``, i.e. ``$HF_HOME/hub``).
        local_files_only: never use the network (like ``HF_HUB_OFFLINE=1``).
        force: download again even if cached.
        manifest: another manifest (path, dict or ``Manifest``) than ``UNISEG_HUB_MANIFEST`` or the shipped one.

    A wrong size or sha256 removes the file from the cache and fetches it once more; ``ChecksumError`` if it is
    still wrong (or if there is no network to fetch it again). Unknown names raise ``UnknownModelError``, entries
    without a Hub copy ``NotPublishedError``, a missing file offline ``NotAvailableOfflineError``, other Hub and
    network failures ``DownloadError``; each keeps huggingface_hub's exception as its cause.
    """
    t = _target(name, revision, cache_dir, local_files_only, manifest)
    if force and t.offline_reason:
        raise NotAvailableOfflineError(f"force=True downloads {t.name} again, but downloads are off "
                                       f"({t.offline_reason}); allow downloads or drop force")
    for attempt in (1, 2):
        try:
            path = _fetch(t, force=force or attempt == 2)
        except _IncompleteDownload as e:
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
                              f"{t.entry['revision']} and its {t.filename} has {problem}, so it is not the checkpoint "
                              "the manifest describes; returned unverified, as asked", stacklevel=2)
                return path
            _discard(t, path)
            if t.offline_reason:
                raise ChecksumError(
                    f"{t.label}: the cached file {path} has {problem}; it was removed from the cache. Downloads are "
                    f"off ({t.offline_reason}): fetch it again with `uniseg-hub download {t.name}` where the "
                    "network is available, or copy an intact cache", path=path, expected=t.entry["sha256"])
            if attempt == 2:
                raise ChecksumError(
                    f"{t.label}: the file served by {t.endpoint} has {problem}, again after fetching it a second "
                    "time; it was removed from the cache. Something between you and the Hub alters the file (check "
                    f"HF_ENDPOINT, mirrors and proxies), or the manifest entry ({t.manifest.path}) does not match the "
                    "repository", path=path, expected=t.entry["sha256"])
            logger.warning("%s: the file %s has %s; removed it, fetching it once more", t.label, path, problem)
    raise AssertionError("unreachable")


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
                                f"`uniseg-hub download {t.name} --force`", path=path, expected=t.entry["sha256"],
                                actual=digest)
        _mark(t, path)
    return path


def cache_status(name: str, cache_dir: str | os.PathLike | None = None, manifest=None) -> dict:
    """Where ``name`` is cached (``path``, or None) and whether it was verified since it last changed; no network,
    no hashing."""
    m = load_manifest(manifest)
    entry = m.entry(str(name))
    if not entry["published"]:
        return {"path": None, "verified": False}
    t = _target(name, None, cache_dir, True, m)
    found = try_to_load_from_cache(t.repo_id, t.filename, cache_dir=t.cache_dir, revision=t.revision)
    if not isinstance(found, str):
        return {"path": None, "verified": False}
    return {"path": found, "verified": _is_marked(t, Path(found))}


def cache_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """The huggingface_hub cache folder that downloads go to (``HF_HUB_CACHE``, by default ``$HF_HOME/hub``)."""
    return Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE).expanduser().resolve()
