"""uniseg-hub: the UniSeg universal 3D segmentation model (arXiv 2304.03493) for MONAI and the Hugging Face Hub.

    from uniseg_hub import UniSeg, load_encoder
    encoder = load_encoder("path/to/converted", in_channels=1)   # or a model name from list_models()
    model = UniSeg.from_pretrained("ORG/NAME")                   # a Hub repository; save_pretrained, push_to_hub

Attributes are imported on first use, so ``uniseg-hub list`` and friends start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    ChecksumError,
    ConfigError,
    DownloadError,
    IncompatibleCheckpointError,
    InputError,
    InputShapeError,
    ManifestError,
    NotAvailableOfflineError,
    NotPublishedError,
    PublishError,
    UnisegHubError,
    UnknownModelError,
    UnknownTaskError,
    UnsafeCheckpointError,
    UnsupportedChannelsError,
    UpstreamFileError,
)

_LAZY = {
    "UniSeg": "pretrained", "UniSegBackbone": "pretrained", "UniSegEncoder": "networks",
    "UniSegConfig": "config", "ManifestEntry": "config",
    "load_encoder": "pretrained", "load_model": "pretrained", "model_tasks": "pretrained",
    "convert_checkpoint": "weights",
    "download": "upstream", "verify": "upstream", "list_models": "hub", "model_info": "hub", "load_manifest": "hub",
    "publish": "app.publish", "preprocess": "app.preprocess", "postprocess": "app.preprocess",
}

if TYPE_CHECKING:  # what __getattr__ hands out, for type checkers and IDEs
    from .app.preprocess import postprocess, preprocess  # noqa: F401
    from .app.publish import publish  # noqa: F401
    from .config import ManifestEntry, UniSegConfig  # noqa: F401
    from .hub import list_models, load_manifest, model_info  # noqa: F401
    from .networks import UniSegEncoder  # noqa: F401
    from .pretrained import UniSeg, UniSegBackbone, load_encoder, load_model, model_tasks  # noqa: F401
    from .upstream import download, verify  # noqa: F401
    from .weights import convert_checkpoint  # noqa: F401


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "__version__", *_LAZY,
    "UnisegHubError", "UnknownTaskError", "InputShapeError", "UnsupportedChannelsError", "UnsafeCheckpointError",
    "IncompatibleCheckpointError", "ManifestError", "UnknownModelError", "NotPublishedError", "DownloadError",
    "NotAvailableOfflineError", "ChecksumError", "UpstreamFileError", "PublishError", "ConfigError", "InputError",
]
