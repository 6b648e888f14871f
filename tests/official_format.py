"""Official UniSeg (nnU-Net v1) weight format, rebuilt without the official code.

Test support only. Everything here is written from the observed structure of the
official classes (github yeerwen/UniSeg @ e3ae40de, ``UniSeg_model`` in
``Upstream/nnunet/network_architecture/Prompt_generic_UNet.py`` and
``UniSeg_Backbone`` in ``Downstream/nnunet/network_architecture/PromptNet.py``);
``tests/golden/make_official_golden.py`` checks ``official_shapes`` against the
real classes. No official code is imported or copied.

All kernels and spatial sizes use the official nnU-Net axis order (z, y, x);
inputs are (B, C, z, y, x).
"""

from __future__ import annotations

import math
import pickle
import types
from collections import OrderedDict

import numpy as np
import torch

try:  # numpy >= 2 (and 1.26 stubs)
    from numpy._core.multiarray import scalar as _np_scalar
except ImportError:  # pragma: no cover - older numpy
    from numpy.core.multiarray import scalar as _np_scalar

__all__ = [
    "POOL_KERNELS",
    "CONV_KERNELS",
    "official_shapes",
    "seeded_state_dict",
    "save_official_checkpoint",
    "seeded_input",
    "sample_indices",
]

#: Strides of the 5 down-sampling steps (z, y, x), fixed in the official trainers.
POOL_KERNELS = ((1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2))
#: Conv kernels of the 6 encoder stages (z, y, x).
CONV_KERNELS = ((1, 3, 3),) + ((3, 3, 3),) * 5


def _conv(sd: dict, prefix: str, cin: int, cout: int, kernel, *, norm: bool = True) -> None:
    """One nnU-Net ``ConvDropoutNormNonlin`` block: conv (with bias) + affine InstanceNorm."""
    sd[f"{prefix}.conv.weight"] = (cout, cin, *kernel)
    sd[f"{prefix}.conv.bias"] = (cout,)
    if norm:
        sd[f"{prefix}.instnorm.weight"] = (cout,)
        sd[f"{prefix}.instnorm.bias"] = (cout,)


def official_shapes(
    *,
    base_features: int = 32,
    max_features: int = 320,
    num_tasks: int = 11,
    num_classes: int = 4,
    patch_zyx=(64, 192, 192),
    downstream_classes: int | None = None,
) -> "OrderedDict[str, tuple[int, ...]]":
    """State-dict key -> shape of the official network, in official key order.

    ``downstream_classes=None``: upstream ``UniSeg_model`` (prompt + FUSE +
    shared ``num_classes`` head). ``downstream_classes=N``: downstream
    ``UniSeg_Backbone`` (no prompt/FUSE, ``tu.0`` without the prompt channel,
    heads ``seg_outputs_down.*`` with N outputs); ``num_tasks``,
    ``num_classes`` and ``patch_zyx`` are then ignored.

    Official order: ``intermedia_prompt``, ``fusion_layer.*`` (upstream only),
    then ``conv_blocks_localization.*`` BEFORE ``conv_blocks_context.*``, then
    ``tu.*`` and the heads. (nnU-Net v1 registers the decoder ModuleList first.)
    """
    feats = [min(base_features * 2**i, max_features) for i in range(6)]
    upstream = downstream_classes is None
    sd: "OrderedDict[str, tuple[int, ...]]" = OrderedDict()

    if upstream:
        prompt_hw = tuple(p // s for p, s in zip(patch_zyx, (16, 32, 32)))
        sd["intermedia_prompt"] = (1, num_tasks, *prompt_hw)
        fin = feats[5] + num_tasks
        hidden = fin // 4
        for i, (ci, co) in enumerate([(fin, hidden), (hidden, hidden), (hidden, num_tasks)]):
            _conv(sd, f"fusion_layer.blocks.{i}", ci, co, CONV_KERNELS[5])

    # Decoder: stage u upsamples towards encoder stage 4-u. Its convs use
    # CONV_KERNELS[5-u], so the full-resolution stage (u=4) uses 3x3x3 (nnU-Net quirk).
    for u in range(5):
        skip, k = feats[4 - u], CONV_KERNELS[5 - u]
        _conv(sd, f"conv_blocks_localization.{u}.0.blocks.0", 2 * skip, skip, k)
        _conv(sd, f"conv_blocks_localization.{u}.1.blocks.0", skip, skip, k)

    # Encoder stage 0: three stems (1, 2, 4 input channels) sharing one InstanceNorm.
    for c in (1, 2, 4):
        sd[f"conv_blocks_context.0.blocks.0.conv_{c}.weight"] = (feats[0], c, *CONV_KERNELS[0])
        sd[f"conv_blocks_context.0.blocks.0.conv_{c}.bias"] = (feats[0],)
    sd["conv_blocks_context.0.blocks.0.instnorm.weight"] = (feats[0],)
    sd["conv_blocks_context.0.blocks.0.instnorm.bias"] = (feats[0],)
    _conv(sd, "conv_blocks_context.0.blocks.1", feats[0], feats[0], CONV_KERNELS[0])
    for d in range(1, 5):  # first conv of each stage is strided by POOL_KERNELS[d-1]
        _conv(sd, f"conv_blocks_context.{d}.blocks.0", feats[d - 1], feats[d], CONV_KERNELS[d])
        _conv(sd, f"conv_blocks_context.{d}.blocks.1", feats[d], feats[d], CONV_KERNELS[d])
    _conv(sd, "conv_blocks_context.5.0.blocks.0", feats[4], feats[5], CONV_KERNELS[5])
    _conv(sd, "conv_blocks_context.5.1.blocks.0", feats[5], feats[5], CONV_KERNELS[5])

    # Transposed convs (bias=False), weight layout (in, out, *kernel), kernel == stride.
    for u in range(5):
        cin = feats[5 - u] + (1 if upstream and u == 0 else 0)  # +1: selected task prompt
        sd[f"tu.{u}.weight"] = (cin, feats[4 - u], *POOL_KERNELS[4 - u])

    head, ncls = ("seg_outputs", num_classes) if upstream else ("seg_outputs_down", downstream_classes)
    for u in range(5):  # 1x1x1 heads, no bias; index 0 is the lowest resolution
        sd[f"{head}.{u}.weight"] = (ncls, feats[4 - u], 1, 1, 1)
    return sd


def seeded_state_dict(shapes, seed: int) -> "OrderedDict[str, torch.Tensor]":
    """Deterministic float32 weights for ``shapes`` (one generator, keys in given order).

    Each tensor is ``torch.randn(shape, generator=g)`` times a scale, plus a shift:

    * ``intermedia_prompt``: scale 1 (like the official ``torch.randn`` init);
    * ``*.instnorm.weight``: ``1 + 0.1 * randn``; ``*.instnorm.bias``: ``0.1 * randn``;
    * other 1-D tensors (conv biases): ``0.1 * randn``;
    * ``tu.*.weight`` (ConvTranspose3d, layout (in, out, *k), kernel == stride):
      ``sqrt(2 / in)`` with ``in = shape[0]``, because each output voxel sees exactly
      one kernel tap of every input channel;
    * other weights (Conv3d, layout (out, in, *k), incl. heads):
      ``sqrt(2 / fan_in)``, ``fan_in = shape[1] * prod(shape[2:])``.
    """
    g = torch.Generator().manual_seed(int(seed))
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for key, shape in shapes.items():
        t = torch.randn(tuple(shape), generator=g, dtype=torch.float32)
        if key == "intermedia_prompt":
            pass
        elif key.endswith("instnorm.weight"):
            t = 1.0 + 0.1 * t
        elif len(shape) == 1:
            t = 0.1 * t
        elif key.startswith("tu."):
            t = t * math.sqrt(2.0 / shape[0])
        else:
            t = t * math.sqrt(2.0 / (shape[1] * math.prod(shape[2:])))
        out[key] = t.contiguous()
    return out


class _LegacyNumpyPickler(pickle._Pickler):
    """Pure-python pickler that writes numpy-1.x global names.

    numpy >= 2 pickles scalars as ``numpy._core.multiarray.scalar``; the official
    checkpoints (2023, numpy 1.x) say ``numpy.core.multiarray.scalar``.
    """

    def save_global(self, obj, name=None):
        if obj is _np_scalar:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\nscalar\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def save_official_checkpoint(
    path,
    state_dict,
    *,
    extra_numpy: bool = True,
    momentum_buffers: bool = False,
    legacy_numpy_names: bool = True,
    epoch: int = 1000,
) -> None:
    """Write ``state_dict`` in the layout of an nnU-Net v1 ``.model`` file.

    Mirrors ``NetworkTrainer.save_checkpoint``: a ``torch.save``-d dict with
    ``epoch``, ``state_dict``, ``optimizer_state_dict`` (SGD-like, nesterov 0.99),
    ``lr_scheduler_state_dict`` (None), ``plot_stuff`` (4 lists: train losses,
    val losses, val losses in train mode (empty), val Dice), ``best_stuff``
    ((best_epoch, best_MA_tr_loss, best_val_MA)) and ``amp_grad_scaler``
    (``GradScaler.state_dict()``-like plain dict).

    ``extra_numpy``: loss/metric entries are ``numpy.float64`` scalars (as in a
    real file; needs ``weights_only=False`` or allowlisted numpy globals), else
    python floats. ``momentum_buffers``: store a zero momentum buffer per tensor
    (doubles the file size, like a real file); otherwise the optimizer state is
    empty. ``legacy_numpy_names``: pickle numpy scalars under the numpy-1.x name
    ``numpy.core.multiarray.scalar`` (as a 2023 file would), not ``numpy._core``.
    """
    sd = OrderedDict((k, v.detach().cpu()) for k, v in state_dict.items())
    num = np.float64 if extra_numpy else float
    tr = [num(1.0 - 0.001 * i) for i in range(3)]
    val = [num(0.9 - 0.001 * i) for i in range(3)]
    dice = [num(0.5 + 0.01 * i) for i in range(3)]
    optimizer = {
        "state": {i: {"momentum_buffer": torch.zeros_like(v)} for i, v in enumerate(sd.values())}
        if momentum_buffers
        else {},
        "param_groups": [
            {
                "lr": 1e-2 * (1 - (epoch - 1) / epoch) ** 0.9,
                "momentum": 0.99,
                "dampening": 0,
                "weight_decay": 3e-5,
                "nesterov": True,
                "initial_lr": 1e-2,
                "params": list(range(len(sd))),
            }
        ],
    }
    save_this = {
        "epoch": epoch,
        "state_dict": sd,
        "optimizer_state_dict": optimizer,
        "lr_scheduler_state_dict": None,
        "plot_stuff": (tr, val, [], dice),
        "best_stuff": (epoch - 1, num(tr[-1]), num(dice[-1])),
        "amp_grad_scaler": {
            "scale": 65536.0,
            "growth_factor": 2.0,
            "backoff_factor": 0.5,
            "growth_interval": 2000,
            "_growth_tracker": 17,
        },
    }
    if extra_numpy and legacy_numpy_names:
        legacy = types.ModuleType("_legacy_numpy_pickle")
        legacy.Pickler = _LegacyNumpyPickler
        torch.save(save_this, path, pickle_module=legacy)
    else:
        torch.save(save_this, path)


def seeded_input(shape_bczyx, seed: int) -> torch.Tensor:
    """Standard-normal float32 input of shape (B, C, z, y, x) from ``torch.Generator(seed)``."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(tuple(shape_bczyx), generator=g, dtype=torch.float32)


def sample_indices(numel: int, count: int, seed: int) -> torch.Tensor:
    """Sorted, distinct flat indices (int64) into a tensor with ``numel`` elements.

    ``min(count, numel)`` indices: the first entries of ``torch.randperm(numel)``
    drawn from ``torch.Generator(seed)``, then sorted.
    """
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(int(numel), generator=g)[: int(count)].sort().values
