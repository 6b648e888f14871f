"""NIfTI in and out for the bundle: MONAI's nibabel reader and writer with fast memory-order changes, written
atomically.

NIfTI stores voxels in Fortran order, MONAI works on C-ordered arrays. MONAI and nibabel convert between the two
with numpy's general strided copy, which on a 512x512x300 CT takes ~2 s each way (longer than resampling it). Here
the axis reversal is two cache-friendly copies in torch (a 2-D transpose, then moves of whole rows), ~4x faster,
with the same values (``reverse_axes``).
"""

from __future__ import annotations

import gzip
import threading
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import NibabelReader, NibabelWriter

from ..errors import InputError
from ..files import atomic_path


def reverse_axes(array: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of the 3-D ``array`` with its axes reversed: ``out[k, j, i] == array[i, j, k]``.

    Of a Fortran-ordered volume's ``.T`` it gives the C-ordered volume, of a C-ordered volume the ``.T`` of a
    Fortran-ordered one. Dtypes torch cannot hold (e.g. big-endian) take numpy's copy.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only memory maps: only read here
            t = torch.from_numpy(np.ascontiguousarray(array))
    except (TypeError, ValueError):  # dtypes torch lacks, non-native byte order
        return np.ascontiguousarray(np.transpose(array, (2, 1, 0)))
    p, q, r = t.shape
    rows = t.reshape(p, q * r).t().contiguous().view(q, r, p)  # rows[j, k, i] = array[i, j, k]
    return rows.transpose(0, 1).contiguous().numpy()


MIN_SPACING, MAX_SPACING = 1e-3, 100.0
"""Voxel sizes (mm) outside these bounds are a damaged header, not a scan (micro-CT is ~0.01 mm, thick slices ~10)."""
MAX_RESAMPLED_VOXELS = 1 << 30
"""Largest grid (voxels per channel, 4 GiB in float32) an image may be resampled to."""


def check_affine(affine, name) -> np.ndarray:
    """The voxel spacing (mm per axis) of a 3-D image's 4x4 ``affine``; ``InputError`` when it holds NaN or infinity,
    is singular (no volume per voxel) or gives voxel sizes outside [``MIN_SPACING``, ``MAX_SPACING``] mm."""
    affine = np.asarray(affine, dtype=np.float64)
    fix = "; correct the image's header (sform/qform and pixdim), e.g. in 3D Slicer, or export the scan again"
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise InputError(f"{name} has an affine (voxel to world matrix) with NaN or infinite entries{fix}")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    volume = abs(np.linalg.det(affine[:3, :3]))
    if not volume > 1e-6 * float(np.prod(spacing)) or not spacing.all():
        raise InputError(f"{name} has a singular affine (its voxel axes are parallel or of size 0, spacing "
                         f"{_mm(spacing)} mm){fix}")
    if spacing.min() < MIN_SPACING or spacing.max() > MAX_SPACING:
        raise InputError(f"{name} has a voxel size of {_mm(spacing)} mm, outside the {MIN_SPACING:g} to "
                         f"{MAX_SPACING:g} mm of any scan{fix}")
    return spacing


def check_resampled_size(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float], name,
                         channels: int = 1) -> tuple[int, ...]:
    """The grid of ``shape`` at ``spacing`` resampled to ``target`` (mm), nnU-Net's ``round(n * s / t)`` voxels;
    ``InputError`` with the size it would allocate when it exceeds ``MAX_RESAMPLED_VOXELS``."""
    size = np.maximum(1, np.round(np.asarray(spacing, float) / np.asarray(target, float) * np.asarray(shape)))
    voxels = float(np.prod(size))
    if not voxels <= MAX_RESAMPLED_VOXELS:
        gib = voxels * channels * 4 / 2 ** 30
        raise InputError(f"{name}: resampling its {tuple(int(n) for n in shape)} voxels of {_mm(spacing)} mm to the "
                         f"task's {_mm(target)} mm would make a grid of {' x '.join(f'{n:.0f}' for n in size)} voxels "
                         f"({gib:,.1f} GiB in float32), more than the {MAX_RESAMPLED_VOXELS:,} voxels allowed; check "
                         "the voxel size in the image's header")
    return tuple(int(n) for n in size)


def _mm(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in np.asarray(values, float)) + ")"


def read_verified_gzip(path: str | Path) -> bytes:
    """The whole decompressed content of a ``.nii.gz``, with gzip's CRC and length checked: nibabel reads only the
    voxel bytes it needs, never the trailer, so a corrupted or cut-off file would otherwise be segmented."""
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(f"{path} is a damaged gzip file ({e}); the scan is incomplete or corrupted: copy or export "
                         "it again") from e


class NiftiReader(NibabelReader):
    """``NibabelReader`` that hands MONAI C-ordered 3-D volumes (``reverse_axes``), the layout it converts to, and
    reads a ``.nii.gz`` whole with its checksum verified (``read_verified_gzip``), in the one decompression nibabel
    would do anyway."""

    def _get_array_data(self, img, filename):
        try:
            if str(filename).lower().endswith(".gz"):
                img = type(img).from_bytes(read_verified_gzip(filename))
            data = super()._get_array_data(img, filename)
        except InputError:
            raise
        except Exception as e:  # nibabel raises several types for voxels it cannot read (a cut file, a bad header)
            reason = (str(e).splitlines() or [""])[0]
            raise InputError(f"cannot read the voxels of {filename} ({type(e).__name__}: {reason}); the file is "
                             "damaged or incomplete: copy or export it again") from e
        if self.to_gpu or data.ndim != 3 or data.flags.c_contiguous or not data.flags.f_contiguous:
            return data
        return reverse_axes(np.asarray(data).T)


class AtomicNibabelWriter(NibabelWriter):
    """``NibabelWriter`` that writes to a temporary file beside the target and renames it into place, and hands
    nibabel Fortran-ordered data (``reverse_axes``), which it then writes without reordering.

    An interrupted run never leaves a partial NIfTI behind (``CheckInputFilesd`` guards existing outputs). Only a
    single channel is squeezed: MONAI's writer squeezes every trailing axis of size 1, which turns a one-slice
    (x, y, 1) label map into (x, y) and fails on (1, 1, 1).
    """

    def set_data_array(self, data_array, channel_dim=0, squeeze_end_dims=True, **kwargs):
        super().set_data_array(data_array, channel_dim=channel_dim, squeeze_end_dims=False, **kwargs)
        if squeeze_end_dims and self.data_obj.ndim == 4 and self.data_obj.shape[-1] == 1:
            self.data_obj = self.data_obj[..., 0]

    @classmethod
    def create_backend_obj(cls, data_array, affine=None, dtype=None, **kwargs):
        image = super().create_backend_obj(data_array, affine=affine, dtype=dtype, **kwargs)
        data = np.asanyarray(image.dataobj)
        if data.ndim != 3 or data.flags.f_contiguous:
            return image
        return nib.Nifti1Image(reverse_axes(data).T, image.affine, header=image.header, extra=image.extra,
                               file_map=image.file_map)

    def write(self, filename, verbose: bool = False, **kwargs):
        name = str(filename)
        try:
            with atomic_path(filename, suffix=".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix) as tmp:
                super().write(tmp, verbose=verbose, **kwargs)
        except OSError as e:
            _WRITE_ERRORS.last = e  # SaveImage turns it into "cannot find a suitable writer" (``write_error``)
            raise


_WRITE_ERRORS = threading.local()


def write_error(clear: bool = True) -> OSError | None:
    """The ``OSError`` (disk full, permission denied...) of this thread's last failed ``AtomicNibabelWriter.write``:
    MONAI's ``SaveImage`` reports any failed write as ``RuntimeError("... cannot find a suitable writer ...")`` and
    keeps only its text."""
    error = getattr(_WRITE_ERRORS, "last", None)
    if clear:
        _WRITE_ERRORS.last = None
    return error
