"""Output names exist once: ``CaseLayout`` names what ``SaveImaged`` writes, what ``CheckInputFilesd`` guards and
what sits beside the label map; the case name ignores the case of the image suffix."""

import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import SaveImaged

from uniseg_hub.errors import InputError
from uniseg_hub.pipeline import CheckInputFilesd, case_name, cases
from uniseg_hub.pipeline.cases import CaseLayout, CaseReader, output_case_name
from uniseg_hub.pipeline.nifti_io import AtomicNibabelWriter
from uniseg_hub.training.evaluation import _case_name


@pytest.mark.parametrize("subject, case", [
    ("/data/scan.nii.gz", "scan"), ("/data/SCAN.NII.GZ", "SCAN"), ("/data/Scan.Nii.Gz", "Scan"),
    ("/data/scan.nii", "scan"), ("/data/SCAN.NII", "SCAN"), ("/data/scan.mha", "scan"), ("/data/scan.NRRD", "scan"),
    ("/data/patient.7.nii.gz", "patient.7"), ("/data/dicom_series/", "dicom_series"), ("/data/dicom.v2", "dicom.v2"),
    ("relative/case_0000.nii.gz", "case"), ("/data/BraTS_001_0000.nii.gz", "BraTS_001"),
    ("/data/patient_0001.nii.gz", "patient_0001"), ("/data/_0000.nii.gz", "_0000"),
])
def test_case_names_ignore_the_case_of_the_suffix(subject, case, tmp_path):
    assert output_case_name(subject) == case  # outputs: without nnU-Net's first-channel suffix
    assert case_name(subject) == case or case_name(subject) == case + "_0000"
    layout = CaseLayout(tmp_path, "liver")
    assert layout.filename(subject=subject) == os.path.join(str(tmp_path), f"{case}_liver.nii.gz")
    saved = layout.filename(subject=subject)
    assert layout.companion(saved, "preview.png") == os.path.join(str(tmp_path), f"{case}_liver_preview.png")
    assert CaseLayout(tmp_path, "liver_probabilities").filename(subject=subject).endswith(
        f"{case}_liver_probabilities.nii.gz")
    assert _case_name({"pred": MetaTensor(torch.zeros(1), meta={"filename_or_obj": subject})}) == case


def test_save_imaged_with_the_layout_records_where_it_saved(tmp_path):
    layout = CaseLayout(tmp_path / "out", "liver")
    image = MetaTensor(torch.ones(1, 4, 5, 6), affine=torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0])),
                       meta={"filename_or_obj": "/in/SCAN.NII.GZ"})
    save = SaveImaged("pred", folder_layout=layout, savepath_in_metadict=True, output_dtype=np.uint8,
                      print_log=False, writer=AtomicNibabelWriter)
    out = save({"pred": image})["pred"]
    expected = str(tmp_path / "out" / "SCAN_liver.nii.gz")
    assert out.meta["saved_to"] == expected
    assert sorted(os.listdir(tmp_path / "out")) == ["SCAN_liver.nii.gz"]  # not SCAN.NII_liver.nii.gz
    assert nib.load(expected).shape == (4, 5, 6)


def test_the_input_check_guards_every_layout_it_is_given(tmp_path):
    scan = tmp_path / "SCAN.NII.GZ"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.int16), np.eye(4)), scan)
    layouts = [CaseLayout(tmp_path / "out", "liver"), CaseLayout(tmp_path / "out", "liver_probabilities")]
    check = CheckInputFilesd("image", folder_layout=layouts, overwrite=False)
    check({"image": str(scan)})  # nothing there yet
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "SCAN_liver_probabilities.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match="SCAN_liver_probabilities.nii.gz already exists"):
        check({"image": str(scan)})
    CheckInputFilesd("image", folder_layout=layouts, overwrite=True)({"image": str(scan)})


def test_the_checked_header_is_the_one_the_reader_loads(tmp_path, monkeypatch):
    scan = tmp_path / "scan.nii.gz"
    data = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    nib.save(nib.Nifti1Image(data, np.eye(4)), scan)
    loads = []
    real = nib.load
    monkeypatch.setattr(nib, "load", lambda path, *a, **k: loads.append(str(path)) or real(path, *a, **k))
    assert cases.count_channels([{"image": str(scan)}]) == 1
    CheckInputFilesd("image")({"image": str(scan)})
    image = CaseReader().read((str(scan),))
    np.testing.assert_array_equal(np.asanyarray(image.dataobj), data)
    assert loads == [str(scan)]
    CaseReader().read((str(scan),))  # taken once: a second load opens the file again
    assert loads == [str(scan)] * 2
    # a file changed after its header was read is read again
    cases.describe_file(str(scan))
    nib.save(nib.Nifti1Image(data[:2], np.eye(4)), scan)
    assert CaseReader().read((str(scan),)).shape == (2, 4, 5)
