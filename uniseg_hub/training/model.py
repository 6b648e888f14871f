"""The downstream network for fine-tuning, initialised by a transfer mode, and its loss weights."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..config import UniSegConfig
from ..errors import IncompatibleCheckpointError, TrainingError
from ..pretrained import UniSegBackbone, load_model, resolve
from ..transfer import to_backbone
from ..weights import LoadReport
from .distributed import log_main

TRANSFERS = ("backbone", "encoder", "none")


def build_network(num_classes: int, pretrained: str | os.PathLike | None = None, transfer: str = "backbone",
                  in_channels: int = 1, architecture: Mapping | None = None) -> UniSegBackbone:
    """The downstream network (the Hub-aware ``UniSegBackbone`` with deep supervision) initialised by ``transfer``.

    * ``backbone``: the paper's transfer (``uniseg_hub.transfer.to_backbone``): encoder and decoder of the universal
      model (97 of the 115 official tensors), prompt and heads dropped, fresh heads. Inputs with 1, 2 or 4 channels
      use the native stems; for another channel count the stem is adapted as ``load_encoder`` does;
    * ``encoder``: only the encoder of that transfer; decoder and heads freshly initialised;
    * ``none``: random initialisation, with the architecture of ``pretrained`` when given, else ``architecture``
      (``features``/``kernel_sizes``/``strides``) or the official one.

    ``pretrained`` is a manifest name or a converted folder, read once. The load report is logged and kept as
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
        config = resolve(pretrained, pretrained=False)[0] if pretrained else \
            UniSegConfig("UniSegBackbone", num_classes=num_classes, **dict(architecture or {}))
        model = UniSegBackbone(config=config.backbone(num_classes, (in_channels,)))
        report = LoadReport(initialised=list(model.state_dict()))
    else:
        config, _, state, label = resolve(pretrained)
        stem = None if in_channels in config.in_channels else in_channels
        model, report = to_backbone(state, config, num_classes, in_channels=stem,
                                    encoder_only=transfer == "encoder", source=label, backbone=UniSegBackbone)
    for channels, conv in model.encoder.stages[0][0].convs.items():
        conv.requires_grad_(int(channels) == in_channels)
    model.load_report = report
    model.train()
    log_main(f"transfer {transfer} from {pretrained or 'nothing (random initialisation)'}: {report.summary()}")
    return model


def load_trained(weights: str | os.PathLike, num_classes: int, device: str | torch.device = "cpu") -> nn.Module:
    """A fine-tuned checkpoint folder (``last/``, the final one, or ``best/``) for evaluation, checked against
    ``num_classes``."""
    model = load_model(weights, device=device)
    found = model.config.num_classes
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


def checkpoint_provenance(weights: str | os.PathLike) -> dict:
    """What a reported Dice was computed with, as far as the checkpoint says: its path, the epoch it was written at
    and whether that was the final epoch (``last/`` after a finished run: the official protocol's reported model),
    or the validation metric that selected it (``best/``). A manifest name gives only its name."""
    out: dict = {"weights": str(weights)}
    folder = Path(weights)
    config = folder / "config.json"
    if not config.is_file():
        return out
    try:
        source = json.loads(config.read_text()).get("source") or {}
    except (OSError, json.JSONDecodeError):
        source = {}
    for key in ("epoch", "max_epochs", "selected_by"):
        if key in source:
            out[key] = source[key]
    metrics = {k: v for k, v in source.items() if k.startswith("val_")}
    if metrics:
        out["selection_metric"] = metrics
    if "epoch" in out and "max_epochs" in out:
        out["final"] = out["epoch"] == out["max_epochs"]
    return out
