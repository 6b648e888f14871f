"""Pretrained weights by name: the manifest (``manifest``) and verified downloads into the cache (``download``).

Nothing here imports torch, so the command line's ``list``, ``info``, ``download``, ``verify`` and ``path`` start
fast; a test holds that rule.
"""

from ..config import License, ManifestEntry
from .download import (
    cache_folder,
    cache_lock,
    cache_status,
    download,
    download_repo,
    offline_reason,
    parse_repo_id,
    verify,
)
from .manifest import (
    LIBRARY_NAME,
    MANIFEST_ENV,
    MANIFEST_FILE,
    MODEL_TAGS,
    PIPELINE_TAG,
    Manifest,
    list_models,
    load_manifest,
    manifest_entry,
    model_info,
    official_preprocessing,
    packaged_manifest,
    parse_manifest,
)

__all__ = ["cache_folder", "cache_lock", "cache_status", "download", "download_repo", "offline_reason",
           "parse_repo_id", "verify", "LIBRARY_NAME", "MODEL_TAGS", "PIPELINE_TAG",
           "MANIFEST_ENV", "MANIFEST_FILE", "License", "Manifest", "ManifestEntry", "list_models", "load_manifest",
           "manifest_entry", "model_info", "official_preprocessing", "packaged_manifest", "parse_manifest"]
