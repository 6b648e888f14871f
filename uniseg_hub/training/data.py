"""Training data: Decathlon-style datalists checked before any work starts, a validation split carved from the
training cases, intensity normalisation, label checks."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import torch
from monai.config import KeysCollection
from monai.data import load_decathlon_datalist
from monai.transforms import (
    MapTransform,
    NormalizeIntensityd,
    ScaleIntensityRanged,
)

from ..errors import TrainingError
from ..tasks import CT_WINDOW

NORMALIZATIONS = ("ct_window", "ct_dataset", "zscore")


def _read_datalist(datalist_file: str | os.PathLike) -> dict:
    path = Path(datalist_file)
    if not path.is_file():
        raise TrainingError(
            f"datalist {path} does not exist; write it with `uniseg-hub prepare btcv RAW_DIR {path.parent}` (or "
            "`prepare vs`), or pass --datalist_file with a Decathlon-style JSON holding 'training' and 'validation' "
            "lists of {'image': ..., 'label': ...}"
        )
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TrainingError(f"datalist {path} is not valid JSON ({e})") from e
    if not isinstance(content, dict):
        raise TrainingError(f"datalist {path} must be a JSON object with 'training' and 'validation' lists")
    return content


def datalist_property(datalist_file: str | os.PathLike, *keys: str):
    """A value stored in a datalist, e.g. ``datalist_property(f, "properties", "target_spacing")``."""
    value = _read_datalist(datalist_file)
    for depth, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            where = "/".join(keys[: depth + 1])
            raise TrainingError(
                f"datalist {datalist_file} has no '{where}'; `uniseg-hub prepare` writes it, or set the value "
                "that needs it explicitly on the command line"
            )
        value = value[key]
    return value


def label_names(datalist_file: str | os.PathLike) -> list[str]:
    """Class names (background first) from the datalist's ``labels`` mapping ``{"0": "background", ...}``."""
    labels = datalist_property(datalist_file, "labels")
    try:
        ordered = sorted((int(k), str(v)) for k, v in labels.items())
    except (AttributeError, ValueError) as e:
        raise TrainingError(f"'labels' in {datalist_file} must map label values to names, got {labels!r}") from e
    if [k for k, _ in ordered] != list(range(len(ordered))) or len(ordered) < 2:
        raise TrainingError(
            f"'labels' in {datalist_file} must name the values 0..N-1 with N >= 2 (background and at least one "
            f"class), got values {[k for k, _ in ordered]}"
        )
    return [name for _, name in ordered]


def modalities(datalist_file: str | os.PathLike) -> list[str]:
    """Input channels' modalities from the datalist's ``modality`` mapping ``{"0": "CT"}``: one per channel."""
    value = datalist_property(datalist_file, "modality")
    if isinstance(value, str):
        return [value]
    try:
        return [str(v) for _, v in sorted((int(k), v) for k, v in value.items())]
    except (AttributeError, ValueError) as e:
        raise TrainingError(f"'modality' in {datalist_file} must map channel indices to names, got {value!r}") from e


def load_datalist(datalist_file: str | os.PathLike, key: str, base_dir: str | os.PathLike | None = None,
                  labels: Sequence[str] | None = None) -> list[dict]:
    """The ``key`` list ("training", "validation") of a Decathlon-style datalist, with paths resolved against
    ``base_dir`` (default: the datalist's folder) and every file checked to exist before any work starts.

    ``labels``: the class names the configuration trains; a datalist that names its labels must name the same ones
    (catches a BTCV preset run on a VS datalist).
    """
    content = _read_datalist(datalist_file)
    if not content.get(key):
        raise TrainingError(
            f"datalist {datalist_file} has no '{key}' cases; it needs non-empty 'training' and 'validation' lists "
            "(`uniseg-hub prepare` writes the official splits)"
        )
    if labels is not None and "labels" in content and label_names(datalist_file) != list(labels):
        raise TrainingError(
            f"datalist {datalist_file} labels {label_names(datalist_file)} differ from the configured label_names "
            f"{list(labels)}; use the preset that matches the dataset, or set --label_names"
        )
    base = Path(base_dir) if base_dir else Path(datalist_file).parent
    items = load_decathlon_datalist(str(datalist_file), True, key, str(base))
    for item in items:
        for field in ("image", "label"):
            if field not in item:
                raise TrainingError(f"a '{key}' entry of {datalist_file} has no '{field}': {item}")
            paths = item[field] if isinstance(item[field], (list, tuple)) else [item[field]]
            missing = [p for p in paths if not os.path.exists(p)]
            if missing:
                raise TrainingError(
                    f"{missing[0]} (listed in '{key}' of {datalist_file}) does not exist; relative paths are read "
                    f"from {base} (--dataset_dir)"
                )
    return items


def intensity_transform(scheme: str, stats: Mapping | None = None, keys: KeysCollection = "image"):
    """The intensity normalisation ``scheme`` as a MONAI transform.

    * ``ct_window``: UniSeg's pre-training CT normalisation: clip to [-325, 325] HU, scale to [0, 1];
    * ``ct_dataset``: nnU-Net's CT normalisation, which the paper's fine-tuning used: clip to the dataset's
      foreground 0.5 and 99.5 percentiles, then z-score with the foreground mean and standard deviation
      (``stats``: ``percentile_00_5``, ``percentile_99_5``, ``mean``, ``std`` as ``uniseg-hub prepare`` writes them);
    * ``zscore``: per-image, per-channel z-score (nnU-Net's MR normalisation).
    """
    if scheme == "ct_window":
        low, high = CT_WINDOW
        return ScaleIntensityRanged(keys, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
    if scheme == "ct_dataset":
        needed = ("percentile_00_5", "percentile_99_5", "mean", "std")
        if not isinstance(stats, Mapping) or any(k not in stats for k in needed):
            raise TrainingError(
                f"normalization 'ct_dataset' needs the dataset's foreground intensity statistics ({', '.join(needed)}),"
                f" got {stats!r}; `uniseg-hub prepare` stores them in the datalist, or use --normalization ct_window"
            )
        low, high, mean, std = (float(stats[k]) for k in needed)
        std = std if std > 0 else 1.0
        return ScaleIntensityRanged(keys, a_min=low, a_max=high, b_min=(low - mean) / std, b_max=(high - mean) / std,
                                    clip=True)
    if scheme == "zscore":
        return NormalizeIntensityd(keys, nonzero=False, channel_wise=True)
    raise TrainingError(f"unknown normalization {scheme!r}; choose one of {', '.join(NORMALIZATIONS)}")


class CheckLabeld(MapTransform):
    """Fail on a label map the network cannot learn, naming the file: a grid other than the image's, values that
    are not whole numbers in 0..num_classes-1 (the official code hits a CUDA index assert instead, its issue #21)."""

    def __init__(self, keys: KeysCollection, num_classes: int, image_key: str = "image",
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.num_classes = num_classes
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            label = torch.as_tensor(d[key])
            name = getattr(d[key], "meta", {}).get("filename_or_obj", key)
            image = d.get(self.image_key)
            if image is not None and tuple(image.shape[1:]) != tuple(label.shape[1:]):
                raise TrainingError(
                    f"label {name} has shape {tuple(label.shape[1:])} but its image has {tuple(image.shape[1:])}; "
                    "image and label must share one voxel grid"
                )
            if label.shape[0] != 1:
                raise TrainingError(f"label {name} has {label.shape[0]} channels; give one map of class values")
            low, high = float(label.min()), float(label.max())
            if low < 0 or high > self.num_classes - 1 or bool((label != label.round()).any()):
                raise TrainingError(
                    f"label {name} has values in [{low:g}, {high:g}] but the network learns the classes "
                    f"0..{self.num_classes - 1} (num_classes={self.num_classes}); fix the label map or the label "
                    "names in the datalist"
                )
        return d


def carve_validation(cases: Sequence[dict], fraction: float = 0.0, seed: int = 12345) -> tuple[list, list]:
    """(training, validation): a validation split carved from the **training** cases, for model selection.

    ``fraction`` 0 (the official protocol, default) carves nothing: the final checkpoint is the reported model and
    no model is selected. Otherwise ``max(1, round(fraction * N))`` cases, drawn with ``random.Random(seed)`` (the
    same cases for the same list, fraction and seed), validate the run and pick ``best/``; the rest train. The
    datalist's own ``validation`` list (the official test split for BTCV and VS) is never used for selection.
    """
    cases = list(cases)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise TrainingError(f"validation_fraction must be a number in [0, 1), got {fraction!r}")
    if fraction == 0:
        return cases, []
    count = max(1, round(fraction * len(cases)))
    if count >= len(cases):
        raise TrainingError(
            f"validation_fraction {fraction} of {len(cases)} training case(s) leaves none to train on; use a smaller "
            "fraction, or 0 to train on all of them and report the final checkpoint"
        )
    chosen = set(random.Random(seed).sample(range(len(cases)), count))
    return ([c for i, c in enumerate(cases) if i not in chosen], [c for i, c in enumerate(cases) if i in chosen])
