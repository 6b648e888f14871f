"""nnU-Net v1's sliding window, on MONAI's ``PatchInferer``: the official window positions and Gaussian map.

The official inference (UniSeg's ``neural_network._internal_predict_3D_3Dconv_tiled``, unchanged from nnU-Net v1)
pads an image smaller than the patch to the patch size (constant 0, centred), places the windows of each axis
evenly between the first and the last position with a step of at most ``patch * step_size`` voxels, multiplies
each window's prediction (the mirrored-and-averaged softmax) by a Gaussian importance map, sums the products and
the maps, divides the two sums, and crops the padding off.

MONAI's ``SlidingWindowInferer`` differs in two places, so it is not used for the official window: its windows
step by ``int(patch * (1 - overlap))`` voxels with the last one moved back to the border (other positions), and its
Gaussian is centred at ``(patch - 1) / 2``, not truncated, and clamped to at least 1e-3 (another map). MONAI's
``PatchInferer`` runs the windows through the network in batches and hands them to a ``Merger``; the positions
(``NnUNetSplitter``) and the weighted average (``WeightedMerger``) are the two pieces MONAI has no option for.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from time import perf_counter
from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer, PatchInferer
from monai.inferers.merger import Merger
from monai.inferers.splitter import Splitter
from monai.networks.layers.convutils import gaussian_1d
from monai.transforms import SpatialPad
from monai.utils import convert_to_dst_type, optional_import

from ..config import parse_bool
from ..errors import ConfigError, InputShapeError

tqdm, has_tqdm = optional_import("tqdm", name="tqdm")
logger = logging.getLogger(__name__)

ANNOUNCE_SECONDS = 60.0
"""A sliding window expected to take longer than this announces its duration (one ``note`` record) after the first
window, whose time it multiplies by the number of windows."""

SIGMA_SCALE = 1.0 / 8
"""nnU-Net v1's Gaussian: sigma is 1/8 of the patch along each axis."""


def window_starts(image_size: Sequence[int], patch_size: Sequence[int], overlap: float = 0.5) -> list[list[int]]:
    """The first voxel of every window along each axis, as nnU-Net v1 places them
    (``SegmentationNetwork._compute_steps_for_sliding_window`` with ``step_size = 1 - overlap``).

    Along an axis of ``n`` voxels and a patch of ``p``: ``ceil((n - p) / (p * step)) + 1`` windows, spread evenly
    from 0 to ``n - p`` (rounded half to even, as ``numpy.round``); one window at 0 when ``n <= p``. ``overlap``
    0.5 (nnU-Net's ``step_size`` 0.5) is the official setting; the windows then overlap by at least half a patch.
    """
    if len(image_size) != len(patch_size):
        raise InputShapeError(f"image size {tuple(image_size)} and patch size {tuple(patch_size)} differ in dimensions")
    if not 0 <= overlap < 1:
        raise ConfigError(f"overlap must be a number from 0 up to (not including) 1, got {overlap!r}")
    step = 1 - overlap
    starts = []
    for size, patch in zip(image_size, patch_size):
        # nnU-Net computes the count in float64 (``np.ceil``) and the positions with ``np.round``; Python's ``ceil``
        # and ``round`` do the same on the same floats (both round half to even)
        count = max(math.ceil((size - patch) / (patch * step)) + 1, 1)
        spacing = (size - patch) / (count - 1) if count > 1 else 0.0
        starts.append([int(round(spacing * i)) for i in range(count)])
    return starts


@functools.lru_cache(maxsize=8)
def _importance_map(patch_size: tuple[int, ...], sigma_scale: float) -> torch.Tensor:
    profiles = []
    for n in patch_size:
        # nnU-Net filters a delta at ``n // 2`` with scipy's ``gaussian_filter`` (sampled kernel, truncated at 4
        # sigma, zero outside); the result is the kernel itself placed at the centre. MONAI's ``gaussian_1d``
        # (``approx="sampled"``) is that kernel; MONAI's ``compute_importance_map`` is not (see the module doc).
        kernel = gaussian_1d(torch.tensor(n * sigma_scale, dtype=torch.float64), truncated=4.0, approx="sampled")
        tail = (kernel.numel() - 1) // 2
        offsets = torch.arange(n) - n // 2
        inside = offsets.abs() <= tail
        profile = torch.zeros(n, dtype=torch.float64)
        profile[inside] = kernel[offsets[inside] + tail].double()
        profiles.append(profile / profile.max())
    weights = profiles[0]
    for profile in profiles[1:]:  # separable: the filtered delta is the outer product of the 1-D kernels
        weights = weights.unsqueeze(-1) * profile
    weights = (weights / weights.max()).float()
    zero = weights == 0
    if zero.any():  # as nnU-Net: no zero weight (a voxel covered only by zeros would divide 0 by 0)
        weights[zero] = weights[~zero].min()
    return weights


def importance_map(patch_size: Sequence[int], sigma_scale: float = SIGMA_SCALE) -> torch.Tensor:
    """nnU-Net v1's Gaussian importance map (``SegmentationNetwork._get_gaussian``) as a float32 tensor of
    ``patch_size``: sigma ``patch * sigma_scale`` per axis, peak 1 at ``patch // 2``, truncated at 4 sigma, zeros
    replaced by the smallest non-zero weight. Computed once per patch size (a copy is returned)."""
    return _importance_map(tuple(int(n) for n in patch_size), float(sigma_scale)).clone()


class NnUNetSplitter(Splitter):
    """The windows of an image already at least one patch in size, at nnU-Net v1's positions (``window_starts``);
    locations are the windows' first voxels. ``progress`` shows a bar over the windows (tqdm)."""

    def __init__(self, patch_size: Sequence[int], overlap: float = 0.5, progress: bool = False):
        super().__init__(patch_size=tuple(patch_size))
        self.overlap = overlap
        self.progress = progress

    def get_input_shape(self, inputs: Any) -> tuple:
        return tuple(inputs.shape[2:])

    def get_padded_shape(self, inputs: Any) -> tuple:
        return self.get_input_shape(inputs)

    def locations(self, spatial_shape: Sequence[int]) -> list[tuple[int, ...]]:
        """Every window's first voxel, the last axis varying fastest (nnU-Net's loop order)."""
        starts = window_starts(spatial_shape, self.patch_size, self.overlap)
        grid = [()]
        for axis in starts:
            grid = [g + (s,) for g in grid for s in axis]
        return grid

    def __call__(self, inputs: Any) -> Iterator[tuple[torch.Tensor, Sequence[int]]]:
        spatial = self.get_input_shape(inputs)
        if any(s < p for s, p in zip(spatial, self.patch_size)):
            raise InputShapeError(f"the image {spatial} is smaller than the patch {self.patch_size}; pad it to the "
                                  f"patch first (NnUNetSlidingWindowInferer does)")
        locations = self.locations(spatial)
        count = len(locations)
        if self.progress and has_tqdm:
            label = f"sliding window ({count} window{'' if count == 1 else 's'})"  # the count is also the total
            locations = tqdm(locations, desc=label, unit="window")
        start = perf_counter()
        for index, location in enumerate(locations):
            if index == 1:  # PatchInferer asks for the second window once the network has run on the first
                announce_duration(perf_counter() - start, count)  # (with sw_batch_size 1, the default)
            window = (slice(None), slice(None)) + tuple(slice(s, s + p) for s, p in zip(location, self.patch_size))
            yield inputs[window], location


def announce_duration(first_window: float, count: int) -> float:
    """The expected seconds of ``count`` windows when the first took ``first_window`` (one-off costs included, so
    rather more than less); logged as one ``note`` record when above ``ANNOUNCE_SECONDS``."""
    expected = first_window * count
    if expected > ANNOUNCE_SECONDS:
        logger.info("the sliding window will take about %.0f min (%d windows x %.1f s, measured on the first)",
                    max(1.0, expected / 60), count, first_window, extra={"note": True})
    return expected


class WeightedMerger(Merger):
    """Sums ``weights * prediction`` and ``weights`` over the windows and divides the two sums: nnU-Net v1's
    aggregation (MONAI's ``AvgMerger`` counts windows and cannot weight them).

    Args:
        merged_shape: (B, C, *spatial) of the merged output. cropped_shape: what ``finalize`` keeps (from 0).
        weights: the importance map, of the window's spatial shape (float32), e.g. ``importance_map``.
        device: where the sums live (default: the weights' device).
    """

    def __init__(self, merged_shape: Sequence[int], cropped_shape: Sequence[int] | None = None,
                 weights: torch.Tensor | None = None, device: torch.device | str | None = None):
        if weights is None:
            raise ConfigError("WeightedMerger needs the importance map: pass weights=importance_map(patch_size)")
        super().__init__(merged_shape=merged_shape, cropped_shape=cropped_shape,
                         device=device if device is not None else weights.device)
        self.weights = weights.to(self.device, torch.float32)
        self.values = torch.zeros(self.merged_shape, dtype=torch.float32, device=self.device)
        self.total = torch.zeros((1, 1, *self.merged_shape[2:]), dtype=torch.float32, device=self.device)

    def aggregate(self, values: torch.Tensor, location: Sequence[int]) -> None:
        if self.is_finalized:
            raise ConfigError("this WeightedMerger is already finalized; make a new one for another image")
        region = tuple(slice(s, s + n) for s, n in zip(location, values.shape[2:]))
        self.values[(slice(None), slice(None), *region)] += values.to(self.device, torch.float32) * self.weights
        self.total[(slice(None), slice(None), *region)] += self.weights

    def finalize(self) -> torch.Tensor:
        if not self.is_finalized:
            self.values.div_(self.total)
            self.values = self.values[tuple(slice(0, n) for n in self.cropped_shape)]
            self.is_finalized = True
        return self.values


class NnUNetSlidingWindowInferer(Inferer):
    """Sliding-window inference as nnU-Net v1 (and so UniSeg) does it: pad to the patch (centred, ``cval``), windows
    at ``window_starts``, each prediction weighted by ``importance_map``, weighted average, padding cropped off.

    What the network returns per window is averaged as is: with ``TaskPredictor`` that is the softmax, averaged
    over the 8 mirrorings when TTA is on, as in the official ``_internal_maybe_mirror_and_pred_3D``.

    Args:
        roi_size: the patch (spatial shape of one window).
        sw_batch_size: windows per network call.
        overlap: ``1 - step_size`` of nnU-Net: 0.5 (official) places windows at most half a patch apart; the
            windows are spread evenly, so neighbours overlap by at least ``overlap`` of a patch.
        sigma_scale: sigma of the Gaussian as a fraction of the patch (official 1/8).
        cval: the padding value for an image smaller than the patch (official 0).
        progress: a progress bar over the windows.
        device: where the merged output lives (default: the input's device).
    """

    def __init__(self, roi_size: Sequence[int], sw_batch_size: int = 1, overlap: float = 0.5,
                 sigma_scale: float = SIGMA_SCALE, cval: float = 0.0, progress: bool = False,
                 device: torch.device | str | None = None):
        super().__init__()
        self.roi_size = tuple(int(n) for n in roi_size)
        self.sw_batch_size = int(sw_batch_size)
        self.overlap = float(overlap)
        window_starts(self.roi_size, self.roi_size, self.overlap)  # checks the overlap now
        self.sigma_scale = float(sigma_scale)
        self.cval = float(cval)
        self.progress = parse_bool(progress, "progress")
        self.device = device

    def count(self, spatial_shape: Sequence[int]) -> int:
        """How many windows an image of ``spatial_shape`` takes (after padding to the patch)."""
        padded = [max(s, p) for s, p in zip(spatial_shape, self.roi_size)]
        return math.prod(len(axis) for axis in window_starts(padded, self.roi_size, self.overlap))

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        meta = MetaTensor([]).copy_meta_from(inputs, copy_attr=False) if isinstance(inputs, MetaTensor) else None
        x = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        spatial = tuple(x.shape[2:])
        if len(spatial) != len(self.roi_size):
            raise InputShapeError(f"the input {tuple(x.shape)} must be (B, C, *spatial) with {len(self.roi_size)} "
                                  f"spatial axes for the patch {self.roi_size}")
        # centred padding, nnU-Net's ``pad_nd_image``: MONAI's symmetric SpatialPad computes the same widths
        widths = SpatialPad(self.roi_size, method="symmetric").compute_pad_width(spatial)[1:]
        if any(w for pair in widths for w in pair):
            flat = [w for pair in reversed(widths) for w in pair]
            x = torch.nn.functional.pad(x, flat, mode="constant", value=self.cval)
        splitter = NnUNetSplitter(self.roi_size, self.overlap, self.progress)
        device = self.device if self.device is not None else inputs.device
        # one window: nnU-Net does not weight it (the Gaussian would cancel out up to rounding)
        single = self.count(spatial) == 1
        weights = torch.ones(self.roi_size) if single else importance_map(self.roi_size, self.sigma_scale)
        patches = PatchInferer(splitter=splitter, merger_cls=WeightedMerger, batch_size=self.sw_batch_size,
                               weights=weights.to(device), device=device)
        merged = patches(x, network, *args, **kwargs)
        merged = merged[(slice(None), slice(None), *(slice(lo, lo + n) for (lo, _), n in zip(widths, spatial)))]
        return convert_to_dst_type(merged, meta if meta is not None else inputs, device=device)[0]
