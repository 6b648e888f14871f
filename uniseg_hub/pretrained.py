"""Pretrained models: build the network a checkpoint describes and load it strictly, with the paper's transfers.

* ``load_model(src)``: the model as saved (the universal model, or a fine-tuned backbone), in eval mode;
* ``load_model(src, num_classes=N)``: the downstream backbone with the paper's transfer from the universal model
  (97 of the 115 official tensors: prompt, fusion and heads dropped, the prompt channel of the first transposed
  conv removed; fresh N-class heads);
* ``load_encoder(src, in_channels=C)``: the six-stage encoder with one stem for C channels (native for 1, 2, 4;
  adapted from the nearest native stem otherwise).

``src`` is a folder written by ``uniseg-hub convert`` (or a ``.safetensors`` file beside its ``config.json``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .errors import UnsupportedChannelsError
from .network import UniSegBackbone, UniSegEncoder
from .weights import LoadReport, build_network, load_checked, read_folder

logger = logging.getLogger(__name__)

MAX_IN_CHANNELS = 64
"""Largest channel count ``load_encoder`` adapts a stem to (an arbitrary sanity bound)."""

def _finish(model: nn.Module, report: LoadReport, config: Mapping, device) -> nn.Module:
    model.load_report = report
    model.pretrained_cfg = dict(config)
    logger.info("%s: %s", type(model).__name__, report.summary())
    return model.to(device).eval()


def load_model(src: str | os.PathLike, *, num_classes: int | None = None, device: str | torch.device = "cpu",
               deep_supervision: bool = True) -> nn.Module:
    """The network stored at ``src`` in eval mode, or the downstream backbone for ``num_classes`` classes."""
    config, state = read_folder(src)
    arch, kwargs = config["architecture"], dict(config["config"])
    if num_classes is None or (arch == "UniSegBackbone" and kwargs["num_classes"] == num_classes):
        model = build_network(config)
        if hasattr(model.decoder, "deep_supervision"):
            model.decoder.deep_supervision = deep_supervision
        return _finish(model, load_checked(model, state, source=str(src)), config, device)
    backbone_kwargs = {k: kwargs[k] for k in ("in_channels", "features", "kernel_sizes", "strides")}
    model = UniSegBackbone(num_classes, deep_supervision=deep_supervision, **backbone_kwargs)
    heads = [k for k in state if k.startswith("decoder.heads.")]
    state = {k: v for k, v in state.items() if k not in heads}
    adapted = {}
    if arch == "UniSeg":
        state["decoder.upsamples.0.weight"] = state["decoder.upsamples.0.weight"][:-1]
        adapted["decoder.upsamples.0.weight"] = "dropped the task-prompt input channel"
    report = load_checked(model, state, may_skip=["prompt.*"], may_initialise=["decoder.heads.*"], source=str(src))
    report.adapted.update(adapted)
    report.skipped += heads
    return _finish(model, report, {**config, "architecture": "UniSegBackbone",
                                   "config": {"num_classes": num_classes, **backbone_kwargs}}, device)


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


def load_encoder(src: str | os.PathLike, *, in_channels: int = 1, out_indices: Sequence[int] | None = None,
                 device: str | torch.device = "cpu") -> UniSegEncoder:
    """The pretrained six-stage encoder of the model at ``src`` with a stem for ``in_channels``, in eval mode.

    The returned encoder has ``feature_info`` (channels, reductions), ``load_report`` (stems taken or adapted,
    tensors skipped) and ``pretrained_cfg``.
    """
    in_channels = check_in_channels(in_channels)
    config, state = read_folder(src)
    kwargs = config["config"]
    native = [int(c) for c in kwargs["in_channels"]]
    encoder = UniSegEncoder((in_channels,), kwargs["features"], kwargs["kernel_sizes"], kwargs["strides"],
                            out_indices=out_indices)
    own_state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    skipped = [k for k in state if not k.startswith("encoder.")]
    wanted = f"stages.0.0.convs.{in_channels}"
    adapted = {}
    if in_channels not in native:
        source = nearest_stem(native, in_channels)
        how = f"adapted from the {source}-channel stem (channels cycled, scaled by {source}/{in_channels})"
        own_state[f"{wanted}.weight"] = adapt_stem(own_state[f"stages.0.0.convs.{source}.weight"], in_channels)
        own_state[f"{wanted}.bias"] = own_state[f"stages.0.0.convs.{source}.bias"]
        adapted = {f"{wanted}.weight": how, f"{wanted}.bias": f"copied from the {source}-channel stem"}
        logger.warning("load_encoder: no native %d-channel stem; %s", in_channels, how)
    report = load_checked(encoder, own_state, may_skip=["stages.0.0.convs.*"], source=str(src))
    report.adapted.update(adapted)
    report.skipped = skipped + [f"encoder.{k}" for k in report.skipped if not k.startswith(wanted)]
    return _finish(encoder, report, config, device)

