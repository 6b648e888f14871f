"""Real scans for tests: the TotalSegmentator examples from PyPI (sha256-pinned, cached), and crops of them."""

import nibabel as nib
import numpy as np
import pytest

from uniseg_hub.app.sample_data import fetch_sample
from uniseg_hub.errors import SampleDataError


def sample(name):
    """The path of a sample scan; the test is skipped, with the reason, when PyPI cannot be reached."""
    try:
        return fetch_sample(name)
    except SampleDataError as e:
        pytest.skip(f"real sample data unavailable (PyPI unreachable?): {e}")


def crop(src, dst, box):
    """Save a crop of a real scan; nibabel's slicer keeps the affine right."""
    image = nib.load(src)
    part = image.slicer[box]
    nib.save(nib.Nifti1Image(np.asanyarray(part.dataobj), part.affine, part.header), dst)
    return dst
