"""Where the MONAI bundle is: shipped inside the installed package (``uniseg_hub/bundle``), or ``bundle/`` beside
the package in a source checkout."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import UnisegHubError

CONFIGS = ("inference.json", "metadata.json")


def bundle_dir(required: bool = True) -> Path | None:
    """The bundle folder (the one with ``configs/inference.json``); None when absent and not ``required``."""
    candidates = [Path(str(resources.files("uniseg_hub") / "bundle")), Path(__file__).resolve().parents[2] / "bundle"]
    for candidate in candidates:
        if all((candidate / "configs" / name).is_file() for name in CONFIGS):
            return candidate
    if required:
        raise UnisegHubError("the MONAI bundle's configs are missing from this installation; reinstall uniseg-hub")
    return None


def config_file(name: str) -> Path:
    """A config of the bundle, e.g. ``config_file("inference.json")``."""
    return bundle_dir() / "configs" / name
