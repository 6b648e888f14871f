"""Back to the input grid: MONAI's ``Invertd`` for the bundle's preprocessing, done as three matrix products.

The preprocessing crops the foreground and resamples to the task's spacing; both keep the image axes, so their
inverse maps every input-grid axis on its own: a voxel row of the output is a linear interpolation between two
voxels of the same row of the prediction (or zero, outside the crop). ``InvertToInputd`` builds that interpolation
as one small matrix per axis (two non-zeros per row; zero rows restore the cropped-away margin) and applies the
three with matrix products in float32: the result equals ``Invertd`` (bilinear, border padding, as the
preprocessing recorded) within float32 tolerance, about 10x faster and without the float64 sampling grid MONAI
builds for a 512x512x300 CT (benchmarks/NOTES.md). Any other trace (another transform, an oblique resampling
matrix, another interpolation mode) is handed to ``Invertd`` unchanged.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Invertd, MapTransform
from monai.utils import TraceKeys

AXIS_ALIGNED_TOLERANCE = 1e-6
"""Largest off-diagonal entry of the voxel-to-voxel resampling matrix still treated as axis-aligned."""


def interpolation_matrix(scale: float, offset: float, out_size: int, in_size: int, first: int = 0,
                         total: int | None = None) -> torch.Tensor:
    """(total, in_size) float64 matrix of linear interpolation along one axis.

    Row ``first + i`` (``0 <= i < out_size``) samples the input at ``scale * i + offset``, clamped to the input
    (MONAI's "border" padding) and weighted between its two neighbours (``grid_sample`` with ``align_corners=False``
    in voxel coordinates); the other rows of the ``total`` are zero (the margin a crop removed).
    """
    total = out_size if total is None else total
    position = (torch.arange(out_size, dtype=torch.float64) * scale + offset).clamp(0, in_size - 1)
    low = position.floor().long().clamp(max=in_size - 1)
    high = (low + 1).clamp(max=in_size - 1)
    weight = position - low
    matrix = torch.zeros(total, in_size, dtype=torch.float64)
    rows = torch.arange(first, first + out_size)
    matrix.index_put_((rows, low), 1 - weight, accumulate=True)
    matrix.index_put_((rows, high), weight, accumulate=True)
    return matrix


def resample_separable(data: torch.Tensor, matrices) -> torch.Tensor:
    """Apply one (out, in) matrix per spatial axis to (C, X, Y, Z) data: three float32 matrix products."""
    channels, x, y, z = data.shape
    wx, wy, wz = (m.to(torch.float32) for m in matrices)
    out = torch.matmul(wx, data.reshape(channels, x, y * z))  # (C, X', Y*Z)
    out = torch.matmul(wy, out.reshape(channels * wx.shape[0], y, z))  # (C*X', Y', Z)
    out = torch.matmul(out.reshape(-1, z), wz.t())  # (C*X'*Y', Z')
    return out.reshape(channels, wx.shape[0], wy.shape[0], wz.shape[0])


def _separable_plan(image: MetaTensor):
    """(per-axis matrices, output affine) for the image's trace when it is [CropForeground] + SpatialResample
    (bilinear, border, align_corners False, axis-aligned), else None."""
    ops = list(image.applied_operations)
    names = [op[TraceKeys.CLASS_NAME] for op in ops]
    if names not in (["SpatialResample"], ["CropForeground", "SpatialResample"]):
        return None
    resample = ops[-1]
    info = resample[TraceKeys.EXTRA_INFO]
    if (info.get("mode"), info.get("padding_mode"), info.get("align_corners")) != ("bilinear", "border", False):
        return None
    before = np.asarray(info["src_affine"], dtype=np.float64)  # the grid the resampling started from
    now = np.asarray(image.affine, dtype=np.float64)
    xform = np.linalg.solve(now, before)  # voxel of the grid before -> voxel of the prediction
    if np.abs(xform[:3, :3] - np.diag(np.diag(xform[:3, :3]))).max() > AXIS_ALIGNED_TOLERANCE:
        return None
    size = [int(s) for s in resample[TraceKeys.ORIG_SIZE]]
    first, total, affine = [0, 0, 0], size, before
    if names[0] == "CropForeground":
        crop = ops[0]
        cropped = [int(c) for c in crop[TraceKeys.EXTRA_INFO]["cropped"]]
        if crop[TraceKeys.EXTRA_INFO]["pad_info"] and any(
                any(p) for p in crop[TraceKeys.EXTRA_INFO]["pad_info"][TraceKeys.EXTRA_INFO]["padded"]):
            return None  # the crop padded (allow_smaller=False): not this bundle's preprocessing
        first, total = cropped[0::2], [int(s) for s in crop[TraceKeys.ORIG_SIZE]]
        shift = np.eye(4)
        shift[:3, 3] = -np.asarray(first, dtype=np.float64)
        affine = before @ shift
    in_size = image.shape[1:]
    matrices = [interpolation_matrix(xform[a, a], xform[a, 3], size[a], in_size[a], first[a], total[a])
                for a in range(3)]
    return matrices, affine


class InvertToInputd(MapTransform):
    """``Invertd(keys, transform, orig_keys, nearest_interp=False, to_tensor=True)`` with the bundle's crop +
    resampling inverted by three matrix products (module docstring); other traces go to ``Invertd`` itself.

    Args:
        keys: the predictions to bring back to the input grid (C, *network grid).
        transform: the preprocessing whose trace is inverted (for the ``Invertd`` fallback).
        orig_keys: the preprocessed image whose trace and metadata describe the way back.
    """

    def __init__(self, keys: KeysCollection, transform, orig_keys: str = "image"):
        super().__init__(keys)
        self.orig_key = orig_keys
        self.fallback = Invertd(keys, transform=transform, orig_keys=orig_keys, nearest_interp=False, to_tensor=True)

    def __call__(self, data):
        image = data[self.orig_key]
        plan = _separable_plan(image) if isinstance(image, MetaTensor) else None
        if plan is None:
            return self.fallback(data)
        matrices, affine = plan
        d = dict(data)
        meta = copy.deepcopy(dict(image.meta))
        meta.pop("affine", None)
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        if "pixdim" in meta:
            meta["pixdim"] = np.concatenate([np.asarray(meta["pixdim"][:1]), spacing, np.asarray(meta["pixdim"][4:])])
        for key in self.key_iterator(d):
            pred = d[key].as_tensor() if isinstance(d[key], MetaTensor) else torch.as_tensor(d[key])
            out = resample_separable(pred.to(torch.float32), matrices)
            d[key] = MetaTensor(out, affine=torch.as_tensor(affine, dtype=torch.float64), meta=meta)
        return d
