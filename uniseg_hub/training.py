"""Fine-tuning UniSeg with MONAI's workflows: the pieces MONAI and ignite lack, wired by ``bundle/configs/train.json``.

The paper's downstream protocol (``shared/reference/uniseg-official.md`` §3, §5) maps onto MONAI as follows:

* network and transfer: ``build_network``: ``backbone`` (the paper: encoder and decoder, 97 of the 115 official
  tensors), ``encoder`` only, or ``none``, through ``uniseg_hub.load_model`` / ``load_encoder``;
* loss: MONAI's ``DeepSupervisionLoss`` around ``DiceCELoss`` with nnU-Net's level weights (``ds_weights``); MONAI
  resizes the target to each level with nearest-neighbour interpolation, which is nnU-Net's target downsampling;
* patch sampling and spatial augmentation: ``RandPatchd`` (nnU-Net's foreground oversampling, rotation and isotropic
  scaling in a single resampling); the intensity augmentations and mirroring are MONAI transforms in train.json;
* optimisation: SGD with torch's ``PolynomialLR`` stepped by MONAI's ``LrScheduleHandler``, ``GradientClipping``
  (after AMP unscaling, before the step) and ``FreezeEncoder`` for the first K epochs;
* bookkeeping: ``TrainingLog`` (loss, learning rate, validation metric per epoch: ``history.json`` and a PNG of the
  curves) and ``TrainingCheckpoint`` (``best/`` and ``last/`` safetensors folders written atomically, resume).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar as IgniteProgressBar
from monai.config import KeysCollection
from monai.data import load_decathlon_datalist, partition_dataset
from monai.engines import IterationEvents
from monai.transforms import (
    Affine,
    MapTransform,
    NormalizeIntensityd,
    Randomizable,
    ScaleIntensityRanged,
)
from monai.transforms.utils import create_rotate, create_scale
from torch import nn

from .errors import IncompatibleCheckpointError, UnisegHubError
from .files import atomic_path, write_text_atomic
from .network import UniSegBackbone
from .pretrained import load_encoder, load_model
from .tasks import CT_WINDOW
from .weights import LoadReport, load_checked, read_folder, save_folder


TRANSFERS = ("backbone", "encoder", "none")
NORMALIZATIONS = ("ct_window", "ct_dataset", "zscore")
STATE_FILE = "training_state.pt"
STATE_FORMAT = 1


class TrainingError(UnisegHubError, ValueError):
    """A training set-up that cannot work: bad datalist, labels, transfer mode or checkpoint folder."""


class ResumeError(TrainingError):
    """A run that cannot be resumed (or would silently overwrite an earlier one)."""


# --- distributed helpers ------------------------------------------------------------------------------------------

def rank() -> int:
    """This process's rank under ``torchrun`` (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """True on the process that prints and writes files (rank 0, or the only process)."""
    return rank() == 0


def shard(data: Sequence, even_divisible: bool = False, shuffle: bool = False, seed: int = 0) -> list:
    """This rank's part of ``data`` (all of it when not distributed).

    ``even_divisible`` repeats items so every rank gets as many (training); otherwise ranks may differ by one item
    (evaluation: every case is scored exactly once, and the metrics are gathered across ranks).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return list(data)
    world = dist.get_world_size()
    if len(data) < world:
        raise TrainingError(
            f"{len(data)} case(s) cannot be shared by {world} processes (one would get none and hang the gathering "
            f"of gradients or metrics); run with at most {len(data)} processes (torchrun --nproc_per_node)"
        )
    parts = partition_dataset(data, num_partitions=world, shuffle=shuffle, seed=seed, even_divisible=even_divisible)
    return parts[rank()]


def unwrap(network: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` (or the network itself)."""
    return network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network


def flag(value) -> bool:
    """A boolean option as given in a config or on the command line: fire passes ``--resume false`` as the string
    'false', which Python would take as true."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", "none", ""):
        return False
    raise TrainingError(f"expected true or false, got {value!r}")


def loss_of(output) -> float:
    """The loss of a trainer iteration's output, batched (a dict) or decollated (a list of dicts)."""
    item = output[0] if isinstance(output, (list, tuple)) else output
    loss = item["loss"]
    return float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)


# --- datalists --------------------------------------------------------------------------------------------------

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


# --- network and transfer ---------------------------------------------------------------------------------------

def _architecture(model: nn.Module) -> dict:
    return {k: model.config[k] for k in ("features", "kernel_sizes", "strides")}


def _print(message: str) -> None:
    if is_main_process():
        print(message, flush=True)


def build_network(num_classes: int, pretrained: str | os.PathLike | None = None, transfer: str = "backbone",
                  in_channels: int = 1, architecture: Mapping | None = None) -> UniSegBackbone:
    """The downstream network (``UniSegBackbone`` with deep supervision) initialised by ``transfer``.

    * ``backbone``: the paper's transfer, ``load_model(pretrained, num_classes=...)``: encoder and decoder of the
      universal model (97 of the 115 official tensors), prompt and heads dropped, fresh heads. Inputs with 1, 2 or
      4 channels use the native stems; for another channel count the stem is adapted as ``load_encoder`` does;
    * ``encoder``: only the encoder of that transfer; decoder and heads freshly initialised;
    * ``none``: random initialisation, with the architecture of ``pretrained`` when given, else ``architecture``
      (``features``/``kernel_sizes``/``strides``) or the official one.

    ``pretrained`` is a manifest name or a converted folder. The load report is printed and kept as
    ``network.load_report``. Stems for other channel counts stay in the network (and its checkpoints) but get
    ``requires_grad=False``: they receive no gradient, as in the paper, and DistributedDataParallel needs no
    unused-parameter search for them.
    """
    if transfer not in TRANSFERS:
        raise TrainingError(f"unknown transfer {transfer!r}; choose one of {', '.join(TRANSFERS)}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise TrainingError(f"in_channels must be a positive whole number, got {in_channels!r}")
    if transfer != "none" and not pretrained:
        raise TrainingError(
            f"transfer {transfer!r} needs pretrained weights: pass --pretrained with a manifest name or a folder "
            "written by `uniseg-hub convert`, or --transfer none to train from scratch"
        )
    if transfer == "none":
        arch = _architecture(load_model(pretrained, pretrained=False)) if pretrained else dict(architecture or {})
        model = UniSegBackbone(num_classes, in_channels=(in_channels,), **arch)
        report = LoadReport(initialised=list(model.state_dict()))
    else:
        model = load_model(pretrained, num_classes=num_classes)
        report = model.load_report
        if in_channels not in model.config["in_channels"]:
            model, report = _with_stem(model, load_encoder(pretrained, in_channels=in_channels), num_classes)
        if transfer == "encoder":
            fresh = UniSegBackbone(num_classes, in_channels=model.config["in_channels"], **_architecture(model))
            encoder = {k: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
            decoder = [k for k in model.state_dict() if k.startswith("decoder.")]
            adapted = {k: how for k, how in report.adapted.items() if k.startswith("encoder.")}
            skipped = report.skipped + [k for k in decoder if k not in report.initialised]
            model, report = fresh, load_checked(fresh, encoder, may_initialise=["decoder.*"], source=str(pretrained))
            report.adapted, report.skipped = adapted, skipped
    for channels, stem in model.encoder.stages[0][0].convs.items():
        stem.requires_grad_(int(channels) == in_channels)
    model.load_report = report
    model.train()
    _print(f"transfer {transfer} from {pretrained or 'nothing (random initialisation)'}: {report.summary()}")
    return model


def _with_stem(model: nn.Module, encoder: nn.Module, num_classes: int) -> tuple[UniSegBackbone, LoadReport]:
    """``model`` (the paper's transfer) rebuilt with the single input stem of ``encoder`` (adapted by load_encoder)."""
    stem = "encoder.stages.0.0.convs."
    (channels,) = encoder.in_channels
    rebuilt = UniSegBackbone(num_classes, in_channels=(channels,), **_architecture(model))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith((stem, "decoder.heads."))}
    state.update({f"encoder.{k}": v for k, v in encoder.state_dict().items() if k.startswith("stages.0.0.convs.")})
    report = load_checked(rebuilt, state, may_initialise=["decoder.heads.*"], source="backbone transfer")
    report.adapted = {**model.load_report.adapted,
                      **{f"encoder.{k}": how for k, how in encoder.load_report.adapted.items()}}
    report.skipped = model.load_report.skipped + [k for k in model.state_dict() if k.startswith(stem)]
    return rebuilt, report


def load_trained(weights: str | os.PathLike, num_classes: int, device: str | torch.device = "cpu") -> nn.Module:
    """A fine-tuned checkpoint folder (``best/`` or ``last/``) for evaluation, checked against ``num_classes``."""
    model = load_model(weights, device=device)
    found = model.config.get("num_classes")
    if found != num_classes:
        raise IncompatibleCheckpointError(
            f"{weights} predicts {found} classes but the datalist/configuration has {num_classes}; evaluate it with "
            "the datalist and preset it was trained with"
        )
    return model


def ds_weights(levels: int = 5) -> list[float]:
    """nnU-Net's deep-supervision weights: 1/2^i, the coarsest level masked to 0, normalised to sum 1.

    For five levels: [8, 4, 2, 1, 0] / 15 = [0.5333, 0.2667, 0.1333, 0.0667, 0].
    """
    if levels < 1:
        raise TrainingError(f"deep supervision needs at least one level, got {levels}")
    weights = [1 / 2**i for i in range(levels)]
    if levels > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


# --- transforms -------------------------------------------------------------------------------------------------

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


def _crop(image: torch.Tensor, start: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """``image[:, start:start+size]`` with zeros where the box leaves the image."""
    slices, pads = [], []
    for s, p, n in zip(start, size, image.shape[1:]):
        lo, hi = max(s, 0), min(s + p, n)
        slices.append(slice(lo, hi))
        pads.append((lo - s, s + p - hi))
    out = image[(slice(None), *slices)]
    return F.pad(out, [v for pair in reversed(pads) for v in pair])


class RandPatchd(Randomizable, MapTransform):
    """nnU-Net v1's training patch: foreground oversampling, then rotation and isotropic scaling, one resampling.

    Centre: with probability ``foreground_prob`` a random voxel of a foreground class drawn uniformly among the
    classes present in the case (class locations from MONAI's ``ClassesToIndicesd`` under ``indices_key``; nnU-Net
    precomputes 10,000 per class the same way), otherwise a uniform position; either is clamped so that the patch
    stays inside images larger than it (smaller images end up wholly inside the patch, zero-padded).

    Spatial augmentation (nnU-Net's ``SpatialTransform`` without elastic deformation): with ``prob_rotate`` a rotation
    by U(-rotate_range, rotate_range) about each axis, and independently with ``prob_scale`` an isotropic scale drawn
    below or above 1 with equal chance within ``scale_range``. With either, the patch is resampled about its centre by
    MONAI's ``Affine`` from the whole image (``mode`` per key, zeros outside), so rotated corners hold real voxels;
    without, it is cut out directly. Outputs are plain tensors of ``spatial_size``; ``indices_key`` is removed.
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str,
        spatial_size: Sequence[int],
        indices_key: str | None = None,
        foreground_prob: float = 0.5,
        rotate_range: float = math.pi / 6,
        prob_rotate: float = 0.2,
        scale_range: Sequence[float] = (0.7, 1.4),
        prob_scale: float = 0.2,
        mode: Sequence[str] | str = ("bilinear", "nearest"),
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.label_key = label_key
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.indices_key = indices_key
        self.foreground_prob = foreground_prob
        self.rotate_range = rotate_range
        self.prob_rotate = prob_rotate
        self.scale_range = tuple(scale_range)
        self.prob_scale = prob_scale
        self.mode = (mode,) * len(self.keys) if isinstance(mode, str) else tuple(mode)
        if len(self.mode) != len(self.keys):
            raise TrainingError(f"RandPatchd needs one mode per key, got {self.mode} for {self.keys}")
        self.center: np.ndarray | None = None
        self.angles: tuple[float, float, float] | None = None
        self.scale: float | None = None

    def _bounds(self, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        size = np.array(self.spatial_size)
        shape = np.array(shape)
        inside = np.stack([size // 2, shape - size + size // 2])
        return inside.min(0), inside.max(0)

    def randomize(self, shape: Sequence[int], indices: Sequence | None = None) -> None:
        low, high = self._bounds(shape)
        classes = [c for c in range(1, len(indices)) if len(indices[c])] if indices is not None else []
        if classes and self.R.rand() < self.foreground_prob:
            locations = np.asarray(indices[classes[self.R.randint(len(classes))]])
            flat = int(locations[self.R.randint(len(locations))])
            self.center = np.clip(np.array(np.unravel_index(flat, tuple(shape))), low, high)
        else:
            self.center = np.array([self.R.randint(lo, hi + 1) for lo, hi in zip(low, high)])
        self.angles = None
        if self.R.rand() < self.prob_rotate:
            self.angles = tuple(float(a) for a in self.R.uniform(-self.rotate_range, self.rotate_range, 3))
        self.scale = None
        if self.R.rand() < self.prob_scale:
            low_s, high_s = self.scale_range
            if self.R.rand() < 0.5 and low_s < 1:
                self.scale = float(self.R.uniform(low_s, 1.0))
            else:
                self.scale = float(self.R.uniform(max(low_s, 1.0), high_s))

    def _affine(self, shape: Sequence[int]) -> torch.Tensor:
        """Output-to-input voxel map (MONAI's centred grid): rotate and scale about the patch centre."""
        matrix = np.eye(4)
        if self.angles is not None:
            matrix = matrix @ create_rotate(3, self.angles)
        if self.scale is not None:
            matrix = matrix @ create_scale(3, [self.scale] * 3)
        size = np.array(self.spatial_size)
        offset = size // 2 - (size - 1) / 2  # the centre voxel's position on MONAI's centred output grid
        matrix[:3, 3] = self.center - (np.array(shape) - 1) / 2 - matrix[:3, :3] @ offset
        return torch.as_tensor(matrix, dtype=torch.float64)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        indices = d.pop(self.indices_key, None) if self.indices_key else None
        shape = tuple(d[self.label_key].shape[1:])
        self.randomize(shape, indices)
        start = [int(c) - s // 2 for c, s in zip(self.center, self.spatial_size)]
        resample = self.angles is not None or self.scale is not None
        affine = self._affine(shape) if resample else None
        for key, mode in zip(self.key_iterator(d), self.mode):
            image = d[key]
            image = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
            if resample:
                d[key] = torch.as_tensor(Affine(affine=affine, spatial_size=self.spatial_size, mode=mode,
                                                padding_mode="zeros", image_only=True)(image)).as_subclass(torch.Tensor)
            else:
                d[key] = _crop(image, start, self.spatial_size)
        return d


# --- engine handlers ----------------------------------------------------------------------------------------------

class GradientClipping:
    """Clip the gradient norm after backward and before the optimizer step (nnU-Net: 12); with AMP the gradients
    are unscaled first, as the official trainer does, so the threshold applies to true gradients."""

    def __init__(self, max_norm: float = 12.0):
        self.max_norm = max_norm

    def attach(self, engine: Engine) -> None:
        if getattr(engine, "accumulation_steps", 1) != 1:
            raise TrainingError("GradientClipping clips every step; it does not combine with accumulation_steps > 1")
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.amp and engine.scaler is not None:
            engine.scaler.unscale_(engine.optimizer)
        torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_norm)


class FreezeEncoder:
    """Keep the encoder frozen (no gradient, no update, no weight decay) for the first ``epochs`` epochs.

    Needs ``optim_set_to_none`` on the trainer, so frozen parameters have no gradient for SGD to apply, and
    ``find_unused_parameters`` under DistributedDataParallel (multi_gpu_train.json sets it).
    """

    def __init__(self, network: nn.Module, epochs: int = 0):
        if epochs < 0:
            raise TrainingError(f"freeze_encoder_epochs must be 0 or more, got {epochs}")
        self.epochs = epochs
        self.params = [p for p in unwrap(network).encoder.parameters() if p.requires_grad]
        self.frozen: bool | None = None

    def attach(self, engine: Engine) -> None:
        if self.epochs:
            engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        frozen = engine.state.epoch <= self.epochs
        if frozen != self.frozen:
            for p in self.params:
                p.requires_grad_(not frozen)
            self.frozen = frozen
            _print(f"epoch {engine.state.epoch}: encoder {'frozen' if frozen else 'unfrozen'}")


class ProgressBar(IgniteProgressBar):
    """ignite's tqdm progress bar showing the loss, attachable as a MONAI handler (``attach(engine)``)."""

    def __init__(self, persist: bool = True, **kwargs):
        super().__init__(persist=persist, **kwargs)

    def attach(self, engine: Engine, *args, **kwargs) -> None:
        super().attach(engine, output_transform=lambda output: {"loss": loss_of(output)})


def _all_mean(total: float, count: int, device) -> float:
    """Mean of per-rank sums over all ranks."""
    if dist.is_available() and dist.is_initialized():
        values = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
        dist.all_reduce(values)
        total, count = values.tolist()
    return total / max(count, 1)


def new_history() -> dict:
    """The per-epoch record ``TrainingLog`` keeps in ``trainer.state.history`` (saved with the last checkpoint)."""
    return {"epoch": [], "loss": [], "lr": [], "val_epoch": [], "val_metric": [], "metric": ""}


class TrainingLog:
    """Per-epoch training loss (averaged over the epoch's iterations and all ranks), learning rate and validation
    metric; rank 0 writes them to ``log_dir/history.json`` and plots them to ``log_dir/training_curves.png``.

    The record lives in ``trainer.state.history``, so ``TrainingCheckpoint`` saves it and a resumed run continues
    the same curves. Attach it after the ``ValidationHandler``, so an epoch's files include its validation.
    """

    def __init__(self, log_dir: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None,
                 validator: Engine | None = None, plot: bool = True):
        self.log_dir = Path(log_dir)
        self.optimizer = optimizer
        self.validator = validator
        self.plot = flag(plot)
        self.trainer: Engine | None = None
        self._sum, self._count, self._lr = 0.0, 0, None

    @property
    def history(self) -> dict:
        return self.trainer.state.history

    def attach(self, engine: Engine) -> None:
        self.trainer = engine
        engine.state.history = new_history()
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        if self.validator is not None:
            self.validator.add_event_handler(Events.EPOCH_COMPLETED, self._validated)

    def _epoch_started(self, engine: Engine) -> None:
        self._sum, self._count = 0.0, 0
        self._lr = self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else None

    def _iteration_completed(self, engine: Engine) -> None:
        self._sum += loss_of(engine.state.output)
        self._count += 1

    def _epoch_completed(self, engine: Engine) -> None:
        self.history["epoch"].append(engine.state.epoch)
        self.history["loss"].append(_all_mean(self._sum, self._count, engine.state.device))
        self.history["lr"].append(self._lr)
        self.write()

    def _validated(self, evaluator: Engine) -> None:
        self.history["metric"] = evaluator.state.key_metric_name or ""
        self.history["val_epoch"].append(evaluator.state.epoch)
        self.history["val_metric"].append(float(evaluator.state.metrics[self.history["metric"]]))

    def write(self) -> None:
        if not is_main_process():
            return
        write_text_atomic(self.log_dir / "history.json", json.dumps(self.history, indent=1) + "\n")
        if self.plot:
            with atomic_path(self.log_dir / "training_curves.png", suffix=".png") as tmp:
                self._plot(tmp)

    def _plot(self, path: str) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(10, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax_loss, ax_val = fig.subplots(1, 2)
        ax_loss.plot(self.history["epoch"], self.history["loss"], marker=".", label="training loss")
        ax_loss.set(xlabel="epoch", ylabel="Dice + CE loss (deep supervision)", title="training loss")
        if any(lr is not None for lr in self.history["lr"]):
            ax_lr = ax_loss.twinx()
            ax_lr.plot(self.history["epoch"], self.history["lr"], color="tab:gray", linestyle="--")
            ax_lr.set_ylabel("learning rate", color="tab:gray")
        ax_val.plot(self.history["val_epoch"], self.history["val_metric"], marker="o", color="tab:green")
        ax_val.set(xlabel="epoch", ylabel=self.history["metric"] or "metric", title="validation")
        fig.tight_layout()
        fig.savefig(path, format="png")


def _swap_in(partial: Path, target: Path) -> None:
    """Replace folder ``target`` by ``partial`` with renames only: readers see the old or the new folder whole."""
    previous = target.with_name(f".{target.name}.previous")
    shutil.rmtree(previous, ignore_errors=True)
    if target.exists():
        os.replace(target, previous)
    os.replace(partial, target)
    shutil.rmtree(previous, ignore_errors=True)


class TrainingCheckpoint:
    """Best and last checkpoints as safetensors folders, written atomically by rank 0; resuming from the last one.

    * ``ckpt_dir/last/``: ``model.safetensors`` + ``config.json`` (``uniseg_hub.load_model`` reads them) and
      ``training_state.pt`` (trainer position, optimizer, scheduler, AMP scaler, best metric, history; tensors and
      numbers, readable with ``torch.load(weights_only=True)``), every ``save_interval`` epochs and at the end;
    * ``ckpt_dir/best/``: the weights of the epoch with the best validation key metric so far.

    Each folder is written beside its target and renamed into place, so an interruption leaves the previous
    checkpoint whole. ``resume``: continue from ``last/`` (epoch, iteration, optimizer, scheduler, best metric,
    ``TrainingLog``'s history); otherwise a ``ckpt_dir`` that already holds a run is refused unless ``overwrite``.
    """

    def __init__(self, ckpt_dir: str | os.PathLike, network: nn.Module, optimizer: torch.optim.Optimizer,
                 lr_scheduler=None, validator: Engine | None = None, resume: bool = False, overwrite: bool = False,
                 save_interval: int = 1, source: Mapping | None = None):
        if save_interval < 1:
            raise TrainingError(f"save_interval must be 1 or more epochs, got {save_interval}")
        self.ckpt_dir = Path(ckpt_dir)
        self.network = network
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.validator = validator
        self.resume = flag(resume)
        self.overwrite = flag(overwrite)
        self.save_interval = save_interval
        self.source = {k: (v if isinstance(v, (int, float, bool)) or v is None else str(v))
                       for k, v in dict(source or {}).items()}
        self._saved_iteration = -1

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.save_last)
        engine.add_event_handler(Events.COMPLETED, self.save_last)
        if self.validator is not None:
            self.validator.add_event_handler(Events.EPOCH_COMPLETED, self.save_best)

    @property
    def last_dir(self) -> Path:
        return self.ckpt_dir / "last"

    @property
    def best_dir(self) -> Path:
        return self.ckpt_dir / "best"

    def _existing_last(self) -> Path | None:
        """``last/``, or its previous version when an interruption fell between the two renames of a swap."""
        for folder in (self.last_dir, self.last_dir.with_name(".last.previous")):
            if (folder / STATE_FILE).is_file():
                return folder
        return None

    def started(self, engine: Engine) -> None:
        if self.resume:
            self.load(engine)
        elif self._existing_last() is not None and not self.overwrite:
            raise ResumeError(
                f"{self.ckpt_dir} already holds a training run (last/ at epoch "
                f"{self._stored_epoch(self._existing_last())}); continue it with --resume true, start over with "
                "--overwrite true, or choose another --ckpt_dir"
            )

    @staticmethod
    def _stored_epoch(folder: Path) -> int | str:
        try:
            return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)["trainer"]["epoch"]
        except Exception:  # only used in a message
            return "?"

    def _write_folder(self, target: Path, extra_source: Mapping, training_state: Mapping | None) -> None:
        model = unwrap(self.network)
        partial = target.with_name(f".{target.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        architecture = {"architecture": type(model).__name__, "config": model.config}
        save_folder(partial, model.state_dict(), architecture, source={**self.source, **extra_source})
        if training_state is not None:
            with atomic_path(partial / STATE_FILE) as tmp:
                torch.save(dict(training_state), tmp)
        _swap_in(partial, target)

    def save_last(self, engine: Engine) -> None:
        if engine.state.iteration == self._saved_iteration:
            return
        self._saved_iteration = engine.state.iteration
        if not is_main_process():
            return
        state = {
            "format_version": STATE_FORMAT,
            "trainer": {"epoch": engine.state.epoch, "iteration": engine.state.iteration,
                        "epoch_length": engine.state.epoch_length, "max_epochs": engine.state.max_epochs},
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else {},
            "scaler": engine.scaler.state_dict() if getattr(engine, "scaler", None) is not None else {},
            "best_metric": float(self.validator.state.best_metric) if self.validator is not None else -1.0,
            "best_metric_epoch": int(self.validator.state.best_metric_epoch) if self.validator is not None else -1,
            "history": getattr(engine.state, "history", None) or {},
        }
        self._write_folder(self.last_dir, {"epoch": engine.state.epoch, "iteration": engine.state.iteration}, state)

    def save_best(self, evaluator: Engine) -> None:
        state = evaluator.state
        if state.best_metric_epoch != state.epoch or not is_main_process():
            return
        self._write_folder(self.best_dir, {"epoch": state.epoch, state.key_metric_name: float(state.best_metric)},
                           None)
        _print(f"epoch {state.epoch}: new best {state.key_metric_name} {state.best_metric:.4f} -> {self.best_dir}")

    def load(self, engine: Engine) -> None:
        folder = self._existing_last()
        if folder is None:
            raise ResumeError(
                f"nothing to resume: {self.last_dir} holds no checkpoint ({STATE_FILE}); start a new run without "
                "--resume, or point --ckpt_dir at the run to continue"
            )
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        if state.get("format_version") != STATE_FORMAT:
            raise ResumeError(f"{folder / STATE_FILE} has format {state.get('format_version')}, expected "
                              f"{STATE_FORMAT}; it was written by another uniseg-hub version")
        trainer = state["trainer"]
        if trainer["epoch_length"] != engine.state.epoch_length or trainer["max_epochs"] != engine.state.max_epochs:
            raise ResumeError(
                f"the run in {folder} has {trainer['max_epochs']} epochs of {trainer['epoch_length']} iterations, "
                f"this configuration {engine.state.max_epochs} of {engine.state.epoch_length}; resume with the same "
                "--epochs and --iterations_per_epoch (the learning-rate schedule depends on them)"
            )
        if trainer["epoch"] >= trainer["max_epochs"]:
            raise ResumeError(f"the run in {folder} already finished all {trainer['max_epochs']} epochs; nothing to "
                              "resume (the weights are in best/ and last/)")
        config, weights = read_folder(folder)
        model = unwrap(self.network)
        if config["config"] != model.config:
            raise ResumeError(
                f"{folder} holds a {config['config']} network but this configuration builds {model.config}; resume "
                "with the same number of classes and channels"
            )
        load_checked(model, weights, source=str(folder))
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if getattr(engine, "scaler", None) is not None and state["scaler"]:
            engine.scaler.load_state_dict(state["scaler"])
        if self.validator is not None:
            self.validator.state.best_metric = state["best_metric"]
            self.validator.state.best_metric_epoch = state["best_metric_epoch"]
        if state["history"]:
            engine.state.history = state["history"]
        engine.state.iteration = trainer["iteration"]
        engine.state.epoch = trainer["epoch"]
        self._saved_iteration = trainer["iteration"]
        _print(f"resumed {folder}: epoch {trainer['epoch']}/{trainer['max_epochs']}, iteration {trainer['iteration']}"
               f", best metric {state['best_metric']:.4f} at epoch {state['best_metric_epoch']}")


def print_metrics(evaluator: Engine, names: Sequence[str], output_dir: str | os.PathLike | None = None) -> dict:
    """Print the key metric and its per-class means (background excluded) after an evaluation; rank 0 also writes
    them to ``output_dir/summary.json``. Returns ``{"metric": name, "mean": value, "per_class": {...}}``."""
    state = evaluator.state
    name = state.key_metric_name
    details = state.metric_details.get(name) if getattr(state, "metric_details", None) else None
    per_class = {}
    if details is not None:
        values = torch.as_tensor(details, dtype=torch.float64)
        for index, class_name in enumerate(names[1:]):
            if index < values.shape[-1]:
                per_class[class_name] = float(torch.nanmean(values[:, index]))
    cases = int(details.shape[0]) if details is not None else None
    summary = {"metric": name, "mean": float(state.metrics[name]), "cases": cases, "per_class": per_class}
    lines = [f"{name}: {summary['mean']:.4f} over {summary['cases']} case(s)"]
    lines += [f"  {class_name:<32} {value:.4f}" for class_name, value in per_class.items()]
    _print("\n".join(lines))
    if output_dir is not None and is_main_process():
        write_text_atomic(Path(output_dir) / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
