"""InvertToInputd: the bundle's way back to the input grid equals MONAI's Invertd (float32 tolerance)."""

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    Flipd,
    Invertd,
    LoadImaged,
    Spacingd,
)

from uniseg_hub.pipeline import resampling
from uniseg_hub.pipeline.resampling import InvertToInputd, interpolation_matrix


@pytest.fixture(scope="module")
def padded_ct(tmp_path_factory):
    """The real small CT inside a zero margin (which the foreground crop removes), with an odd, flipped spacing."""
    from uniseg_hub.app.sample_data import SampleDataError, fetch_sample

    try:
        source = nib.load(fetch_sample("ct_small"))
    except SampleDataError as e:
        pytest.skip(f"real sample data unavailable (PyPI unreachable?): {e}")
    data = np.asanyarray(source.dataobj).astype(np.int16)
    padded = np.zeros((data.shape[0] + 13, data.shape[1] + 7, data.shape[2] + 5), np.int16)
    padded[5:5 + data.shape[0], 2:2 + data.shape[1], 4:4 + data.shape[2]] = data
    affine = source.affine.copy()
    affine[:3, :3] = np.diag([2.3, -1.7, 2.9])
    path = tmp_path_factory.mktemp("ct") / "padded.nii.gz"
    nib.save(nib.Nifti1Image(padded, affine), path)
    return str(path)


def preprocessing(*extra):
    return Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image"),
                    CropForegroundd("image", "image", select_fn=lambda x: x != 0, allow_smaller=True),
                    Spacingd("image", pixdim=(1.5, 1.5, 3.0), mode="bilinear"), *extra])


def invert_both(pre, path, channels=3):
    data = pre({"image": path})
    image = data["image"]
    g = torch.Generator().manual_seed(0)
    data["pred"] = MetaTensor(torch.rand(channels, *image.shape[1:], generator=g).softmax(0), meta=image.meta,
                              applied_operations=image.applied_operations)
    reference = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True)(dict(data))
    ours = InvertToInputd("pred", transform=pre, orig_keys="image")(dict(data))
    return image, reference["pred"], ours["pred"]


def test_equals_invertd_through_crop_and_resampling(padded_ct, monkeypatch):
    plans = []
    monkeypatch.setattr(resampling, "_separable_plan",
                        lambda image, plan=resampling._separable_plan: plans.append(plan(image)) or plans[-1])
    image, reference, ours = invert_both(preprocessing(), padded_ct)
    assert [op["class"] for op in image.applied_operations] == ["CropForeground", "SpatialResample"]
    assert plans and plans[0] is not None  # the matrix path ran
    assert ours.shape == reference.shape == (3, *nib.load(padded_ct).shape)
    torch.testing.assert_close(ours.as_tensor(), reference.as_tensor().float(), rtol=1e-5, atol=1e-6)
    assert not ours[:, :5].any() and not ours[:, :, :2].any()  # the cropped-away margin is zero, as Invertd pads
    torch.testing.assert_close(ours.affine.double(), reference.affine.double())
    np.testing.assert_allclose(ours.meta["pixdim"], reference.meta["pixdim"], rtol=1e-6)
    assert ours.meta["filename_or_obj"] == reference.meta["filename_or_obj"] and not ours.applied_operations
    assert torch.equal(ours.argmax(0), reference.argmax(0))


def test_other_traces_go_to_invertd(padded_ct):
    _, reference, ours = invert_both(preprocessing(Flipd("image", spatial_axis=0)), padded_ct, channels=2)
    assert torch.equal(ours.as_tensor(), reference.as_tensor())


def test_interpolation_matrix_rows():
    m = interpolation_matrix(0.5, 0.25, out_size=5, in_size=3, first=1, total=8)
    assert m.shape == (8, 3)
    assert not m[0].any() and not m[6:].any()  # outside the crop: zero rows
    torch.testing.assert_close(m[1:6].sum(1), torch.ones(5, dtype=torch.float64))  # weights sum to one
    torch.testing.assert_close(m[1:6] @ torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64),
                               torch.tensor([0.25, 0.75, 1.25, 1.75, 2.0], dtype=torch.float64))  # border: clamped
