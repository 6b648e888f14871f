"""Names, colours and codes travel with the labels: the palette, the colour tables, Slicer's .seg.nrrd and the DICOM
Segmentation, each read back with an independent reader (pynrrd, pydicom/highdicom) and compared with the label map
and the source series' geometry."""

import os
import shlex

import nibabel as nib
import numpy as np
import pytest
from dicom_series import write_series

from uniseg_hub.app.predict import predict
from uniseg_hub.config import PredictOptions
from uniseg_hub.errors import ConfigError, InputError
from uniseg_hub.palette import PALETTE, STRUCTURES, segment, segments, write_colour_tables
from uniseg_hub.pipeline.label_files import (
    output_paths,
    source_frames,
    write_dicom_seg,
    write_seg_nrrd,
)
from uniseg_hub.tasks import TASKS, get_task, merged_label_names

from scans import crop, sample

LIVER = get_task("liver").label_names
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def cielab(rgb):
    from skimage.color import rgb2lab

    return rgb2lab(np.asarray(rgb, dtype=np.float64)[None] / 255.0)[0]


# --- the palette ---------------------------------------------------------------------------------------------------

def test_the_palette_has_eighteen_colours_no_two_alike():
    color = pytest.importorskip("skimage.color")
    lab = cielab(PALETTE)
    distances = [color.deltaE_ciede2000(lab[i], lab[j]) for i in range(len(PALETTE)) for j in range(i)]
    assert len(PALETTE) == 18 and len(set(PALETTE)) == 18
    assert min(distances) > 15, min(distances)  # tab20 has pairs of one hue about 10 apart
    chroma = np.hypot(lab[:, 1], lab[:, 2])
    assert (chroma > 35).all() and (lab[:, 0] > 40).all()  # saturated and bright enough over a grey scan


def test_a_structure_has_one_colour_in_every_task_and_in_the_merged_map():
    assert len(STRUCTURES) == 17 and sorted(STRUCTURES.values()) == list(range(1, 18))
    merged = {s.value: s for s in segments(merged_label_names())}
    for task in TASKS:
        for s in segments(task.label_names):
            twin = merged[task.merged_labels[s.value - 1]]
            assert (s.colour, s.type, s.region) == (twin.colour, twin.type, twin.region), (task.name, s.name)
    # labels of another model: the palette in label order, coded as tissue
    other = segments({0: "background", 1: "aorta", 2: "gallbladder"})
    assert [s.colour for s in other] == list(PALETTE[:2]) and other[0].type[2] == "Tissue"


def test_the_codes_are_the_dicom_standards_snomed_concepts():
    from pydicom.sr.codedict import codes

    seen = set()
    for structure in STRUCTURES:
        s = segment(1, structure)
        for code in filter(None, (s.category, s.type, s.region)):
            seen.add(code)
    for value, scheme, meaning in seen:
        keyword = "".join(word.capitalize() for word in meaning.split())
        standard = getattr(codes.SCT, keyword)
        assert (standard.value, standard.scheme_designator) == (value, scheme), meaning
    assert segment(1, "liver").type == ("10200004", "SCT", "Liver")
    assert segment(2, "liver tumour").region == ("10200004", "SCT", "Liver")


# --- colour tables -------------------------------------------------------------------------------------------------

def test_the_colour_tables_list_every_label_with_its_name_and_colour(tmp_path):
    names = merged_label_names("CT")
    paths = write_colour_tables(tmp_path / "a_all.nii.gz", names)
    assert paths == {"colour_table": str(tmp_path / "a_all_colors.ctbl"),
                     "itksnap_labels": str(tmp_path / "a_all_itksnap_labels.txt")}
    rows = [line.split() for line in (tmp_path / "a_all_colors.ctbl").read_text().splitlines()
            if not line.startswith("#")]
    assert rows[0] == ["0", "background", "0", "0", "0", "0"]
    expected = {s.value: s for s in segments(names)}
    assert len(rows) - 1 == len(expected) == 12
    for value, name, r, g, b, a in rows[1:]:
        s = expected[int(value)]
        assert name == s.name.replace(" ", "_") and (int(r), int(g), int(b)) == s.colour and a == "255"
    snap = [shlex.split(line) for line in (tmp_path / "a_all_itksnap_labels.txt").read_text().splitlines()
            if not line.startswith("#")]
    assert snap[0][-1] == "Clear Label" and len(snap) == 13
    for value, r, g, b, alpha, visible, mesh, name in snap[1:]:
        s = expected[int(value)]
        assert (name, (int(r), int(g), int(b)), float(alpha), visible) == (s.name, s.colour, 1.0, "1")


def test_output_names_sit_beside_the_label_map():
    assert output_paths("out/SCAN_liver.nii.gz", "seg.nrrd") == {
        "colour_table": "out/SCAN_liver_colors.ctbl", "itksnap_labels": "out/SCAN_liver_itksnap_labels.txt",
        "converted": "out/SCAN_liver.seg.nrrd"}
    assert output_paths("out/SCAN_liver.nii.gz", "dicom-seg")["converted"] == "out/SCAN_liver_seg.dcm"
    assert "converted" not in output_paths("out/SCAN_liver.nii.gz", "nifti")


# --- .seg.nrrd -----------------------------------------------------------------------------------------------------

def labelled(shape=(12, 10, 6)):
    labels = np.zeros(shape, np.uint8)
    labels[2:5, 3:7, 1:4] = 1
    labels[6:9, 1:3, 2] = 2
    return labels


AFFINE = np.array([[-0.8, 0, 0, 10.0], [0, 0.9, 0, -20.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])  # L-A-S storage


def test_seg_nrrd_holds_the_label_map_in_lps_with_names_colours_and_terminology(tmp_path):
    nrrd = pytest.importorskip("nrrd")
    labels = labelled()
    write_seg_nrrd(labels, AFFINE, LIVER, tmp_path / "x.seg.nrrd")
    data, header = nrrd.read(str(tmp_path / "x.seg.nrrd"))
    np.testing.assert_array_equal(data, labels)
    assert header["space"] == "left-posterior-superior"
    lps = LPS @ AFFINE  # voxel (i, j, k) -> LPS: origin + sum of the axis directions
    np.testing.assert_allclose(header["space directions"], lps[:3, :3].T)
    np.testing.assert_allclose(header["space origin"], lps[:3, 3])
    assert [header[f"Segment{n}_Name"] for n in range(2)] == ["liver", "liver tumour"]
    assert [header[f"Segment{n}_LabelValue"] for n in range(2)] == ["1", "2"]
    for n, colour in enumerate(PALETTE[:2]):
        np.testing.assert_allclose([float(c) for c in header[f"Segment{n}_Color"].split()], np.array(colour) / 255,
                                   atol=1e-6)
    assert header["Segment0_Extent"] == "2 4 3 6 1 3" and header["Segment1_Extent"] == "6 8 1 2 2 2"
    assert "SCT^10200004^Liver" in header["Segment0_Tags"]
    assert "SCT^108369006^Neoplasm" in header["Segment1_Tags"] and header["Segment1_Tags"].endswith("|")
    assert "Segment2_Name" not in header


def test_slicers_own_reader_finds_the_segments(tmp_path):
    slicerio = pytest.importorskip("slicerio")  # 3D Slicer's Python reader of .seg.nrrd files
    labels = labelled()
    write_seg_nrrd(labels, AFFINE, LIVER, tmp_path / "x.seg.nrrd")
    seg = slicerio.read_segmentation(str(tmp_path / "x.seg.nrrd"))
    np.testing.assert_allclose(seg["ijkToLPS"], LPS @ AFFINE)
    assert [(s["name"], s["labelValue"], s["layer"]) for s in seg["segments"]] == [("liver", 1, 0),
                                                                                   ("liver tumour", 2, 0)]
    np.testing.assert_allclose([s["color"] for s in seg["segments"]], np.array(PALETTE[:2]) / 255, atol=1e-6)
    liver, tumour = (s["terminology"] for s in seg["segments"])
    assert liver["type"] == ["SCT", "10200004", "Liver"] and tumour["anatomicRegion"] == ["SCT", "10200004", "Liver"]
    extracted = slicerio.extract_segments(seg, [("liver tumour", 7)])
    np.testing.assert_array_equal(extracted["voxels"], np.where(labels == 2, 7, 0))


# --- DICOM SEG -----------------------------------------------------------------------------------------------------

def series_for(labels, affine, folder):
    """A CT series (pydicom) on the grid of ``labels``: slices along the third axis, rows along the second."""
    scan = folder.parent / f"{folder.name}.nii.gz"
    nib.save(nib.Nifti1Image(labels.astype(np.int16) * 100, affine), scan)
    return write_series(scan, folder)


def read_seg(path):
    import highdicom as hd

    return hd.seg.segread(str(path))


@pytest.mark.parametrize("affine", [AFFINE, np.diag([0.7, 0.7, 2.0, 1.0])], ids=["LAS", "RAS"])
def test_dicom_seg_references_the_series_and_lands_on_its_images(tmp_path, affine):
    pytest.importorskip("highdicom")
    from pydicom import dcmread

    labels = labelled()
    series = series_for(labels, affine, tmp_path / "series")
    write_dicom_seg(labels, affine, LIVER, series, tmp_path / "seg.dcm", model="uniseg-11task@abc1234")
    seg = read_seg(tmp_path / "seg.dcm")
    sources = {str(ds.SOPInstanceUID): ds for ds in (dcmread(p) for p in sorted(series.iterdir()))}
    first = next(iter(sources.values()))
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.SegmentationType == "BINARY"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID and seg.StudyInstanceUID == first.StudyInstanceUID
    referenced = {str(i.ReferencedSOPInstanceUID) for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(sources)
    # one segment per label: name, codes, colour
    assert [(s.SegmentNumber, s.SegmentLabel) for s in seg.SegmentSequence] == [(1, "liver"), (2, "liver tumour")]
    liver, tumour = seg.SegmentSequence
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert liver.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning == "Anatomical Structure"
    assert tumour.SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"
    assert tumour.AnatomicRegionSequence[0].CodeValue == "10200004"
    import highdicom as hd

    for s, colour in zip(seg.SegmentSequence, PALETTE):
        rgb = hd.color.CIELabColor.from_dicom_value(s.RecommendedDisplayCIELabValue).to_rgb()
        np.testing.assert_allclose(rgb, colour, atol=2)
    # geometry: every source image gets back exactly its slice of the label map
    for k, (uid, ds) in enumerate(sorted(sources.items(), key=lambda item: int(item[1].InstanceNumber))):
        frame = seg.get_pixels_by_source_instance(source_sop_instance_uids=[uid], combine_segments=True,
                                                  skip_overlap_checks=True)[0]
        np.testing.assert_array_equal(frame, labels[:, :, k].T, err_msg=f"slice {k}")
    positions = {tuple(round(float(v), 3) for v in f.PlanePositionSequence[0].ImagePositionPatient)
                 for f in seg.PerFrameFunctionalGroupsSequence}
    assert positions <= {tuple(round(float(v), 3) for v in ds.ImagePositionPatient) for ds in sources.values()}


def test_a_series_off_the_label_maps_grid_is_refused(tmp_path):
    labels = labelled()
    series = series_for(labels, AFFINE, tmp_path / "series")
    from pydicom import dcmread

    shifted = AFFINE.copy()
    shifted[0, 3] += 0.4  # half a voxel
    instances = [dcmread(p) for p in sorted(series.iterdir())]
    with pytest.raises(InputError, match="does not lie on the label map's grid"):
        source_frames(labels, shifted, instances)
    np.testing.assert_array_equal(source_frames(labels, AFFINE, instances)[0], labels[:, :, 0].T)


def test_dicom_seg_is_only_for_a_dicom_series_and_the_format_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="format must be one of nifti, seg.nrrd, dicom-seg"):
        PredictOptions(format="rtstruct")
    assert PredictOptions(format=" SEG.NRRD ").format == "seg.nrrd"
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), scan)
    with pytest.raises(InputError, match="--format dicom-seg needs a DICOM series folder"):
        predict(scan, out_dir=str(tmp_path / "out"), format="dicom-seg")
    assert not (tmp_path / "out").exists()


# --- through predict -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_ct(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ct_formats")
    return crop(sample("ct_small"), folder / "abdomen.nii.gz", (slice(20, 60), slice(30, 70), slice(8, 24)))


def test_predict_writes_a_dicom_seg_for_a_dicom_series(converted_small, small_ct, tmp_path):
    pytest.importorskip("itk")
    pytest.importorskip("highdicom")
    series = write_series(small_ct, tmp_path / "series")
    result = predict(series, task="liver", out_dir=str(tmp_path / "out"), weights=str(converted_small), tta=False,
                     progress=False, preview=False, format="dicom-seg")
    out = tmp_path / "out"
    assert result.converted == str(out / "series_liver_seg.dcm")
    assert sorted(os.listdir(out)) == ["series_liver.nii.gz", "series_liver_colors.ctbl",
                                       "series_liver_itksnap_labels.txt", "series_liver_seg.dcm",
                                       "series_liver_volumes.csv", "series_liver_volumes.json"]
    labels = np.asanyarray(nib.load(result.label_map).dataobj)
    assert labels.any()
    from pydicom import dcmread

    seg = read_seg(result.converted)
    sources = sorted((dcmread(p) for p in series.iterdir()), key=lambda ds: int(ds.InstanceNumber))
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "liver tumour"]
    for k, ds in enumerate(sources):  # write_series: slice k of the NIfTI, rows along y
        frame = seg.get_pixels_by_source_instance(source_sop_instance_uids=[str(ds.SOPInstanceUID)],
                                                  combine_segments=True, skip_overlap_checks=True)[0]
        np.testing.assert_array_equal(frame, labels[:, :, k].T, err_msg=f"slice {k}")


def test_predict_writes_seg_nrrd_on_the_label_maps_grid(converted_small, small_ct, tmp_path):
    nrrd = pytest.importorskip("nrrd")
    result = predict(small_ct, task="kidney", out_dir=str(tmp_path / "out"), weights=str(converted_small), tta=False,
                     progress=False, preview=False, format="seg.nrrd")
    assert result.converted == str(tmp_path / "out" / "abdomen_kidney.seg.nrrd")
    saved = nib.load(result.label_map)
    data, header = nrrd.read(result.converted)
    np.testing.assert_array_equal(data, np.asanyarray(saved.dataobj))
    lps = LPS @ saved.affine
    np.testing.assert_allclose(header["space directions"], lps[:3, :3].T, atol=1e-4)
    np.testing.assert_allclose(header["space origin"], lps[:3, 3], atol=1e-4)
    assert [header["Segment0_Name"], header["Segment1_Name"]] == ["kidney", "kidney tumour"]
    table = open(result.colour_table).read()
    kidney = PALETTE[STRUCTURES["kidney"] - 1]
    assert f"1 kidney {kidney[0]} {kidney[1]} {kidney[2]} 255" in table


@pytest.mark.parametrize("fmt, code, message", [
    ("dicom-seg", 1, "error: --format dicom-seg needs a DICOM series folder"),  # a user error
    ("rtstruct", 2, "error: format must be one of nifti, seg.nrrd, dicom-seg")])  # a usage error
def test_the_command_line_refuses_a_format_in_one_line(tmp_path, capsys, fmt, code, message):
    from uniseg_hub import cli

    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), scan)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", str(scan), "--out", str(tmp_path / "out"), "--format", fmt])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == code and err.startswith(message) and "\n" not in err, err


def test_dicom_seg_numbers_segments_from_one_whatever_the_label_values(tmp_path):
    pytest.importorskip("highdicom")
    labels = labelled() * 0
    labels[2:5, 3:7, 1:4] = 14  # the MR all-tasks map: prostate 13, BraTS 14-16
    labels[6:9, 1:3, 2] = 16
    labels[0, 0, 0] = 99  # a value without a name is left out
    names = merged_label_names("MR")
    series = series_for(labels, AFFINE, tmp_path / "series")
    write_dicom_seg(labels, AFFINE, names, series, tmp_path / "seg.dcm")
    seg = read_seg(tmp_path / "seg.dcm")
    assert [(s.SegmentNumber, s.SegmentLabel) for s in seg.SegmentSequence] == [
        (1, "prostate: prostate"), (2, "brats: edema"), (3, "brats: non-enhancing tumour core"),
        (4, "brats: enhancing tumour")]
    from pydicom import dcmread

    instances = sorted((dcmread(p) for p in series.iterdir()), key=lambda ds: int(ds.InstanceNumber))
    expected = np.select([labels == 14, labels == 16], [2, 4], 0)
    for k, ds in enumerate(instances):
        frame = seg.get_pixels_by_source_instance(source_sop_instance_uids=[str(ds.SOPInstanceUID)],
                                                  combine_segments=True, skip_overlap_checks=True)[0]
        np.testing.assert_array_equal(frame, expected[:, :, k].T, err_msg=f"slice {k}")


def test_the_bundles_format_step_checks_its_datalist_when_built(tmp_path):
    from uniseg_hub.pipeline.label_files import SaveLabelFormatd

    series = series_for(labelled(), AFFINE, tmp_path / "series")
    SaveLabelFormatd("pred", format="dicom-seg", datalist=[{"image": str(series)}])  # a DICOM folder: fine
    with pytest.raises(InputError, match="needs a DICOM series folder"):
        SaveLabelFormatd("pred", format="dicom-seg", datalist=[{"image": str(series)}, {"image": "b.nii.gz"}])
    with pytest.raises(ConfigError, match="format must be one of"):
        SaveLabelFormatd("pred", format="rtstruct")
    assert SaveLabelFormatd("pred", datalist=[{"image": "b.nii.gz"}])({"pred": 1}) == {"pred": 1}  # nifti: nothing


# --- a real scanner series (TotalSegmentator's example, from the pinned PyPI archive) -------------------------------

@pytest.fixture(scope="module")
def scanner_series(tmp_path_factory):
    """The 20 images of a SIEMENS CT series (512 x 512, JPEG 2000), as anonymised (no SOP Instance, Study or Series
    UIDs in the data sets), extracted from the sha256-checked TotalSegmentator sdist."""
    import tarfile

    from uniseg_hub.app import sample_data
    from uniseg_hub.files import sha256_file

    sample("ct_small")  # downloads and checks the archive once
    archive = sample_data.cache_dir() / sample_data.SDIST_FILE
    if sha256_file(archive) != sample_data.SDIST_SHA256:
        pytest.skip("the cached TotalSegmentator archive does not match its pinned sha256")
    folder = tmp_path_factory.mktemp("scanner") / "example_ct_dicom"
    folder.mkdir()
    prefix = sample_data.PREFIX + "example_ct_dicom/"
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.startswith(prefix):
                (folder / member.name[len(prefix):]).write_bytes(tar.extractfile(member).read())
    assert len(list(folder.iterdir())) == 20
    return folder


def test_an_anonymised_series_without_uids_is_refused_before_anything_runs(scanner_series, tmp_path):
    pytest.importorskip("highdicom")
    with pytest.raises(InputError, match="no StudyInstanceUID, SeriesInstanceUID .* use --format seg.nrrd"):
        predict(scanner_series, out_dir=str(tmp_path / "out"), weights=str(tmp_path / "no-model"),
                format="dicom-seg")  # the weights are never looked at
    assert not (tmp_path / "out").exists()


def test_dicom_seg_on_a_scanner_series_as_itk_reads_it(scanner_series, tmp_path):
    """The label map on the grid MONAI's ITKReader gives the series (as the bundle reads it) lands on each image:
    SOP Instance UIDs from the file meta information, Study and Series UIDs restored here."""
    pytest.importorskip("itk")
    pytest.importorskip("highdicom")
    from monai.transforms import LoadImage
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    series = tmp_path / "series"
    series.mkdir()
    study, uid = generate_uid(), generate_uid()
    for path in scanner_series.iterdir():
        ds = dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, uid
        ds.save_as(series / path.name)
    image = LoadImage(reader="ITKReader", image_only=True)(str(series))
    affine = np.asarray(image.affine, dtype=np.float64)
    x, y, z = np.meshgrid(*(np.arange(n) for n in image.shape), indexing="ij")
    labels = np.where((x < 200) & (y > 300), 1, np.where((x > 350) & (z % 3 == 0), 2, 0)).astype(np.uint8)
    write_dicom_seg(labels, affine, LIVER, series, tmp_path / "seg.dcm")
    seg = read_seg(tmp_path / "seg.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    world_to_voxel = np.linalg.inv(LPS @ affine)
    for path in series.iterdir():
        ds = dcmread(path, stop_before_pixels=True)
        assert not ds.SOPInstanceUID
        k = world_to_voxel @ [*map(float, ds.ImagePositionPatient), 1.0]
        np.testing.assert_allclose(k[:2], 0, atol=1e-3)
        frame = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[str(ds.file_meta.MediaStorageSOPInstanceUID)], combine_segments=True,
            skip_overlap_checks=True)[0]
        np.testing.assert_array_equal(frame, labels[:, :, int(round(k[2]))].T)
