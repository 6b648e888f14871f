"""The paper's downstream transfer: the one place that decides which tensors move from a pretrained state dict.

* ``to_backbone``: the universal model (or a backbone) -> ``UniSegBackbone`` with fresh N-class heads: encoder and
  decoder move (97 of the 115 official tensors), the prompt, the fusion and the heads do not, and the first
  transposed convolution loses its task-prompt input channel; ``encoder_only`` keeps the decoder fresh too;
* ``to_encoder``: the six-stage encoder with one stem for C channels;
* a stem for a channel count the checkpoint has no stem for is adapted from the nearest native one
  (``adapt_stem``, the timm/SMP rule).

The functions take a state dict already read (``uniseg_hub.pretrained.resolve``), so a checkpoint is read once
whatever is built from it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch

from .config import UniSegConfig
from .errors import UnsupportedChannelsError
from .networks import UniSegBackbone, UniSegEncoder
from .weights import LoadReport, load_checked

logger = logging.getLogger(__name__)

STEM = "encoder.stages.0.0.convs."
"""Prefix of the input stems' tensors: ``encoder.stages.0.0.convs.<channels>.weight`` / ``.bias``."""

MAX_IN_CHANNELS = 64
"""Largest channel count a stem is adapted to (an arbitrary sanity bound)."""


def check_in_channels(in_channels) -> int:
    """Validate a requested channel count; returns it as an int."""
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or not 1 <= in_channels <= MAX_IN_CHANNELS:
        raise UnsupportedChannelsError(
            f"in_channels={in_channels!r} is not supported: UniSeg has native stems for 1, 2 and 4 channels and "
            f"adapts the nearest one for any other whole number from 1 to {MAX_IN_CHANNELS}"
        )
    return in_channels


def adapt_stem(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Stem weight (out, c0, ...) for ``in_channels`` channels: cycle the native channels and scale by c0 / C.

    The timm/SMP rule for input convolutions: an input whose C channels resemble the c0 the stem was trained on
    gives the same pre-activation as before.
    """
    native = weight.shape[1]
    index = torch.arange(in_channels) % native
    return weight[:, index] * (native / in_channels)


def nearest_stem(native: Sequence[int], in_channels: int) -> int:
    """The native stem closest to ``in_channels`` (the larger one on a tie)."""
    return min(native, key=lambda c: (abs(c - in_channels), -c))


def stem_tensors(state: Mapping[str, torch.Tensor], native: Sequence[int],
                 in_channels: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The stem for ``in_channels`` under ``STEM`` (taken, or adapted from the nearest native stem), and how each
    tensor was adapted (empty when native)."""
    wanted = f"{STEM}{in_channels}"
    if in_channels in native:
        return {f"{wanted}.weight": state[f"{wanted}.weight"], f"{wanted}.bias": state[f"{wanted}.bias"]}, {}
    source = nearest_stem(native, in_channels)
    how = f"adapted from the {source}-channel stem (channels cycled, scaled by {source}/{in_channels})"
    logger.warning("no native %d-channel stem; %s", in_channels, how)
    tensors = {f"{wanted}.weight": adapt_stem(state[f"{STEM}{source}.weight"], in_channels),
               f"{wanted}.bias": state[f"{STEM}{source}.bias"]}
    return tensors, {f"{wanted}.weight": how, f"{wanted}.bias": f"copied from the {source}-channel stem"}


def to_backbone(state: Mapping[str, torch.Tensor], config: UniSegConfig, num_classes: int, *,
                in_channels: int | None = None, encoder_only: bool = False, deep_supervision: bool = True,
                source: str = "checkpoint",
                backbone: type[UniSegBackbone] = UniSegBackbone) -> tuple[UniSegBackbone, LoadReport]:
    """The downstream backbone with fresh ``num_classes``-class heads, initialised from ``state`` (of ``config``).

    ``in_channels``: one stem for that channel count (native or adapted) instead of all native stems;
    ``encoder_only``: move the encoder only and keep the decoder freshly initialised. Everything not moved is listed
    in the report's ``skipped``, and every tensor changed on the way in its ``adapted``. ``backbone``: the class to
    build, ``UniSegBackbone`` or a subclass (the Hub-aware ``uniseg_hub.UniSegBackbone``).
    """
    stems = config.in_channels if in_channels is None else (check_in_channels(in_channels),)
    model = backbone(config=config.backbone(num_classes, stems), deep_supervision=deep_supervision)
    moved = {k: v for k, v in state.items() if k.startswith(("encoder.", "decoder.")) and
             not k.startswith((STEM, "decoder.heads."))}
    adapted = {}
    if config.architecture == "UniSeg":
        moved["decoder.upsamples.0.weight"] = moved["decoder.upsamples.0.weight"][:-1]
        adapted["decoder.upsamples.0.weight"] = "dropped the task-prompt input channel"
    for channels in stems:
        tensors, how = stem_tensors(state, config.in_channels, channels)
        moved.update(tensors)
        adapted.update(how)
    if encoder_only:
        moved = {k: v for k, v in moved.items() if k.startswith("encoder.")}
        adapted = {k: how for k, how in adapted.items() if k.startswith("encoder.")}
    report = load_checked(model, moved, may_initialise=["decoder.*"] if encoder_only else ["decoder.heads.*"],
                          source=source)
    report.adapted.update(adapted)
    report.skipped = [k for k in state if k not in moved]
    return model, report


def to_encoder(state: Mapping[str, torch.Tensor], config: UniSegConfig, in_channels: int, *,
               out_indices: Sequence[int] | None = None,
               source: str = "checkpoint") -> tuple[UniSegEncoder, LoadReport]:
    """The six-stage encoder of ``state`` (of ``config``) with one stem for ``in_channels`` (native or adapted)."""
    in_channels = check_in_channels(in_channels)
    encoder = UniSegEncoder((in_channels,), config.features, config.kernel_sizes, config.strides,
                            out_indices=out_indices)
    moved = {k: v for k, v in state.items() if k.startswith("encoder.") and not k.startswith(STEM)}
    tensors, adapted = stem_tensors(state, config.in_channels, in_channels)
    moved.update(tensors)
    report = load_checked(encoder, {k.removeprefix("encoder."): v for k, v in moved.items()}, source=source)
    report.adapted.update({k.removeprefix("encoder."): how for k, how in adapted.items()})
    report.skipped = [k for k in state if k not in moved]
    return encoder, report
