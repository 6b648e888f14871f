"""Pretrained models: build the network a checkpoint describes and load it strictly, with the paper's transfers.

* ``load_model(src)``: the model as saved (the universal model, or a fine-tuned backbone), in eval mode;
* ``load_model(src, num_classes=N)``: the downstream backbone with the paper's transfer from the universal model
  (97 of the 115 official tensors: prompt, fusion and heads dropped, the prompt channel of the first transposed
  conv removed; fresh N-class heads);
* ``load_encoder(src, in_channels=C)``: the six-stage encoder with one stem for C channels (native for 1, 2, 4;
  adapted from the nearest native stem otherwise).

``src`` is a model name from the manifest (weights downloaded from the Hugging Face Hub and sha256-checked by
``uniseg_hub.hub``) or a local checkpoint: a folder written by ``uniseg-hub convert`` or a ``.safetensors`` file
beside its ``config.json``. A ``pathlib.Path`` or a string naming an existing file or folder is local, except that
a manifest name always means the manifest's model (write ``./NAME`` for a folder of that name).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from . import hub
from .errors import (
    ChecksumError,
    UnisegHubError,
    UnknownModelError,
    UnsupportedChannelsError,
)
from .network import UniSegBackbone, UniSegEncoder
from .weights import LoadReport, build_network, load_checked, read_folder, read_safetensors

logger = logging.getLogger(__name__)

MAX_IN_CHANNELS = 64
"""Largest channel count ``load_encoder`` adapts a stem to (an arbitrary sanity bound)."""


def _is_local(src, manifest) -> bool:
    if not isinstance(src, str):
        raise UnisegHubError(f"expected a model name or a path, got {type(src).__name__} {src!r}")
    return src not in manifest.models and (os.path.exists(src) or os.sep in src or "/" in src
                                           or src.endswith(".safetensors"))


def _resolve(src, *, pretrained: bool, revision, cache_dir, local_files_only: bool, weights_path,
             manifest) -> tuple[dict, dict | None, str]:
    """(config with "architecture" and "config", state dict or None when not pretrained, a label for messages)."""
    m = None if isinstance(src, os.PathLike) else hub.load_manifest(manifest)
    if m is None or _is_local(src, m):
        if revision is not None or weights_path is not None:
            raise UnisegHubError(f"revision and weights_path apply to manifest names, not to the local checkpoint "
                                 f"{src}")
        config, state = read_folder(src, tensors=pretrained)
        return config, state if pretrained else None, str(src)
    try:
        entry = m.entry(src)
    except UnknownModelError as e:
        raise UnknownModelError(f"{e}; no file or folder {src!r} exists either") from None
    config = {**{k: v for k, v in entry.items() if k != "architecture"}, **entry["architecture"]}
    if not pretrained:
        return config, None, src
    if weights_path is not None:
        file = Path(weights_path).expanduser()
        if not file.is_file():
            raise UnisegHubError(f"weights_path {file} is not a file; pass the {entry['filename']} of {src}")
        if entry["sha256"] is None:
            logger.warning("%s: the manifest has no sha256 for this model (not published), so %s is not checked",
                           src, file)
        elif (digest := hub.sha256_file(file)) != entry["sha256"]:
            raise ChecksumError(f"weights_path {file} has sha256 {digest}, but the manifest's {src} has "
                                f"{entry['sha256']}: it is another checkpoint; load it by its folder instead",
                                path=file, expected=entry["sha256"], actual=digest)
    else:
        file = hub.download(src, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                            manifest=m)
    return {**config, "weights": str(file)}, read_safetensors(file)[1], f"{src} ({file})"


def _random(model: nn.Module) -> LoadReport:
    """The report of a model built without weights: every tensor keeps its fresh initialisation."""
    return LoadReport(initialised=list(model.state_dict()))


def _finish(model: nn.Module, report: LoadReport, config: Mapping, device) -> nn.Module:
    model.load_report = report
    model.pretrained_cfg = dict(config)
    logger.info("%s: %s", type(model).__name__, report.summary())
    return model.to(device).eval()


def load_model(src: str | os.PathLike, *, num_classes: int | None = None, pretrained: bool = True,
               revision: str | None = None, cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
               weights_path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
               deep_supervision: bool = True, manifest=None) -> nn.Module:
    """The network ``src`` describes in eval mode, or the downstream backbone for ``num_classes`` classes.

    Args:
        src: a manifest name (``list_models()``) or a local checkpoint folder / ``.safetensors`` file.
        num_classes: build the downstream backbone with fresh ``num_classes``-class heads (the paper's transfer).
        pretrained: False builds the architecture with random weights and downloads nothing.
        revision, cache_dir, local_files_only: passed to ``uniseg_hub.download`` for manifest names.
        weights_path: a local copy of the manifest model's file (checked against its sha256), for machines that
            receive files out of band.
        device: where the model goes.
        deep_supervision: return all decoder levels in training mode.
        manifest: another manifest than ``UNISEG_HUB_MANIFEST`` or the shipped one.

    The model has ``load_report`` (tensors loaded, adapted, skipped, initialised) and ``pretrained_cfg`` (the
    manifest entry or the folder's config.json: architecture, preprocessing, license, source).
    """
    config, state, label = _resolve(src, pretrained=pretrained, revision=revision, cache_dir=cache_dir,
                                    local_files_only=local_files_only, weights_path=weights_path, manifest=manifest)
    arch, kwargs = config["architecture"], dict(config["config"])
    if num_classes is None or (arch == "UniSegBackbone" and kwargs["num_classes"] == num_classes):
        model = build_network(config, uninitialised=state is not None)  # a strict load overwrites every tensor
        if hasattr(model.decoder, "deep_supervision"):
            model.decoder.deep_supervision = deep_supervision
        report = _random(model) if state is None else load_checked(model, state, source=label, assign=True)
        return _finish(model, report, config, device)
    backbone_kwargs = {k: kwargs[k] for k in ("in_channels", "features", "kernel_sizes", "strides")}
    model = UniSegBackbone(num_classes, deep_supervision=deep_supervision, **backbone_kwargs)
    backbone_config = {**config, "architecture": "UniSegBackbone",
                       "config": {"num_classes": num_classes, **backbone_kwargs}}
    if state is None:
        return _finish(model, _random(model), backbone_config, device)
    heads = [k for k in state if k.startswith("decoder.heads.")]
    state = {k: v for k, v in state.items() if k not in heads}
    adapted = {}
    if arch == "UniSeg":
        state["decoder.upsamples.0.weight"] = state["decoder.upsamples.0.weight"][:-1]
        adapted["decoder.upsamples.0.weight"] = "dropped the task-prompt input channel"
    report = load_checked(model, state, may_skip=["prompt.*"], may_initialise=["decoder.heads.*"], source=label)
    report.adapted.update(adapted)
    report.skipped += heads
    return _finish(model, report, backbone_config, device)


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


def load_encoder(src: str | os.PathLike, *, in_channels: int = 1, pretrained: bool = True,
                 out_indices: Sequence[int] | None = None, revision: str | None = None,
                 cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                 weights_path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 manifest=None) -> UniSegEncoder:
    """The pretrained six-stage encoder of ``src`` with a stem for ``in_channels``, in eval mode.

    ``src`` and the other options are as for ``load_model``. The encoder has ``feature_info`` (channels,
    reductions), ``load_report`` (stems taken or adapted, tensors skipped) and ``pretrained_cfg`` (preprocessing,
    license, source). ``pretrained=False`` builds the same encoder with random weights without downloading.
    """
    in_channels = check_in_channels(in_channels)
    config, state, label = _resolve(src, pretrained=pretrained, revision=revision, cache_dir=cache_dir,
                                    local_files_only=local_files_only, weights_path=weights_path, manifest=manifest)
    kwargs = config["config"]
    native = [int(c) for c in kwargs["in_channels"]]
    encoder = UniSegEncoder((in_channels,), kwargs["features"], kwargs["kernel_sizes"], kwargs["strides"],
                            out_indices=out_indices)
    if state is None:
        return _finish(encoder, _random(encoder), config, device)
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
    report = load_checked(encoder, own_state, may_skip=["stages.0.0.convs.*"], source=label)
    report.adapted.update(adapted)
    report.skipped = skipped + [f"encoder.{k}" for k in report.skipped if not k.startswith(wanted)]
    return _finish(encoder, report, config, device)
