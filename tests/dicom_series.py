"""Write a NIfTI volume as a DICOM CT series with pydicom (test support): one file per slice, LPS geometry."""

from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

LPS = np.diag([-1.0, -1.0, 1.0])


def write_series(nifti_path, folder) -> Path:
    """Slices along the third array axis; columns = first axis (x), rows = second axis (y)."""
    image = nib.load(str(nifti_path))
    data = np.asanyarray(image.dataobj).astype(np.int16)
    affine = image.affine
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    directions = LPS @ (affine[:3, :3] / spacing)  # columns: x, y, z directions in LPS
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k in range(data.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"slice_{k:04d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.PatientName = "CT", "uniseg-test", "Test^Scan"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        position = LPS @ (affine[:3, :3] @ np.array([0, 0, k]) + affine[:3, 3])
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in np.concatenate([directions[:, 0], directions[:, 1]])]
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # row spacing (y), column spacing (x)
        ds.SliceThickness = f"{spacing[2]:.6f}"
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.ascontiguousarray(data[:, :, k].T).tobytes()
        ds.save_as(str(folder / f"slice_{k:04d}.dcm"), enforce_file_format=True)
    return folder
