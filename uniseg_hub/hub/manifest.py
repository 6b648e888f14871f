"""The weights manifest: which checkpoints load by name, pinned to a repository, a commit, a file, its size and sha256.

The manifest (``weights_manifest.json``, shipped inside the package; ``UNISEG_HUB_MANIFEST=PATH`` or ``manifest=``
replace it) is validated whenever it is read, and names the licence, the architecture, the preprocessing and the
provenance of each model. Each entry is parsed once into a frozen ``uniseg_hub.config.ManifestEntry``; readers use
its attributes. Nothing here imports torch.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .. import __version__
from ..config import ManifestEntry
from ..errors import ManifestError, NotPublishedError, UnknownModelError
from ..tasks import CT_WINDOW, OFFICIAL_TASKS, ZSCORE_EPS, TaskTable

logger = logging.getLogger(__name__)


MANIFEST_FILE = "weights_manifest.json"
MANIFEST_ENV = "UNISEG_HUB_MANIFEST"
SCHEMA_VERSION = 1
LIBRARY_NAME = "uniseg-hub"
"""The library name huggingface_hub puts in the user agent of downloads and uploads, and in model cards."""
MODEL_TAGS = ("medical-imaging", "3d", "segmentation", "monai", "uniseg", "ct", "mri", "pet", "safetensors")
PIPELINE_TAG = "image-segmentation"
"""The tags and the pipeline of a uniseg-hub model card (the one ``publish`` writes, the one ``push_to_hub`` writes)."""

_URL = re.compile(r"https?://\S+")


@dataclass(frozen=True)
class Manifest:
    """A validated manifest: where it came from, its entries by name, and an optional Hub endpoint (a mirror)."""

    path: str
    models: dict[str, ManifestEntry]
    endpoint: str | None = None

    def entry(self, name: str) -> ManifestEntry:
        """The entry called ``name``; ``UnknownModelError`` listing the names otherwise."""
        if name not in self.models:
            raise UnknownModelError(
                f"unknown model {name!r}; the manifest {self.path} lists: {', '.join(self.models) or 'nothing'} "
                "(see `uniseg-hub list`); a converted folder is loaded by its path instead"
            )
        return self.models[name]

    def published_entry(self, name: str) -> ManifestEntry:
        """The entry called ``name`` if it has a copy on the Hub; ``NotPublishedError`` with the ways forward."""
        entry = self.entry(name)
        if not entry.published:
            source = entry.source
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
    counts = Counter(key for key, _ in pairs)
    duplicates = sorted(key for key, n in counts.items() if n > 1)
    if duplicates:
        raise ValueError(f"duplicate key(s) {', '.join(map(repr, duplicates))} in one object")
    return dict(pairs)


def parse_manifest(data, where: str = "manifest") -> Manifest:
    """Validate a decoded manifest (``{"schema_version": 1, "models": [...]}``) and index it by name."""
    def fail(message: str):
        raise ManifestError(f"weights manifest {where}: {message}")

    if not isinstance(data, Mapping):
        fail("the top level must be an object with schema_version and models")
    unknown = [k for k in data if k not in ("schema_version", "description", "endpoint", "models")]
    if unknown:
        fail(f"unknown top-level field(s) {', '.join(map(str, unknown))}")
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
    for i, data in enumerate(entries):
        entry = ManifestEntry.from_dict(data, f"weights manifest {where}: models[{i}]")
        if entry.name in models:
            fail(f"models[{i}]: the name {entry.name!r} is used twice; names must be unique")
        models[entry.name] = entry
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
    except RecursionError:
        raise ManifestError(f"weights manifest {path}{origin} is nested too deeply to be a manifest; restore the "
                            "file (or unset UNISEG_HUB_MANIFEST to use the packaged one)") from None
    return parse_manifest(data, f"{path}{origin}")


def packaged_manifest() -> Manifest:
    """The manifest shipped inside the package (whatever ``UNISEG_HUB_MANIFEST`` says)."""
    with resources.as_file(resources.files("uniseg_hub").joinpath(MANIFEST_FILE)) as path:
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


def list_models(manifest=None) -> list[str]:
    """Names of the manifest's models, published or not (``model_info`` says which)."""
    return list(load_manifest(manifest).models)


def manifest_entry(name: str, manifest=None) -> ManifestEntry:
    """The manifest entry of ``name``, frozen: repository, commit, sha256, size, ``license`` (``commercial_use``),
    ``architecture`` (a ``UniSegConfig``), ``preprocessing`` (patch size, spacing per task, normalisation, axis
    order) and provenance (``source``); ``.to_dict()`` gives its JSON form."""
    return load_manifest(manifest).entry(str(name))


def model_info(name: str, manifest=None) -> dict:
    """The manifest entry of ``name`` as a plain dict (its JSON form, a copy): ``model_info(name)["preprocessing"]``
    has the spacing, normalisation and patch size the weights expect. ``manifest_entry`` gives the typed object."""
    return manifest_entry(name, manifest).to_dict()


def official_preprocessing(patch_size, tasks: TaskTable = OFFICIAL_TASKS) -> dict:
    """The preprocessing block of a universal model: the official rules, per task of ``tasks`` (the model's table;
    the official eleven by default), written from ``uniseg_hub.tasks``."""
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
        } for t in tasks},
    }
