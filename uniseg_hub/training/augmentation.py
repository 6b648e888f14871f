"""nnU-Net v1's training patch sampling and spatial augmentation as one MONAI transform."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import (
    Affine,
    MapTransform,
    Randomizable,
)
from monai.transforms.utils import create_rotate, create_scale

from ..errors import TrainingError


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
