"""Datalists with the paper's splits from fake trees in each public layout of BTCV and VS; clear errors otherwise."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from uniseg_hub.app.prepare import (
    BTCV_LABELS,
    BTCV_TRAIN,
    BTCV_VALIDATION,
    VS_CASES,
    VS_VALIDATION,
    DatasetLayoutError,
    prepare,
    prepare_btcv,
    prepare_vs,
    target_spacing,
    vs_official_split,
)
from uniseg_hub.cli import main
from uniseg_hub.errors import UnisegHubError

BTCV_CASES = BTCV_TRAIN + BTCV_VALIDATION


def nifti(path: Path, data: np.ndarray, spacing=(0.8, 0.8, 3.0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([*spacing, 1.0])), path)


def case_pair(image: Path, label: Path, number: int, spacing=(0.8, 0.8, 3.0)) -> None:
    """A 6x6x4 'scan' whose foreground (label 1) has intensity 100 + number, background -1000."""
    seg = np.zeros((6, 6, 4), np.uint8)
    seg[2:4, 2:4, 1:3] = 1
    nifti(image, np.where(seg > 0, 100 + number, -1000).astype(np.int16), spacing)
    nifti(label, seg, spacing)


def read(out: Path) -> dict:
    return json.loads((out / "datalist.json").read_text())


def test_btcv_synapse_rawdata_gives_the_official_21_9_split(tmp_path):
    raw = tmp_path / "btcv"
    for n in BTCV_CASES:
        case_pair(raw / "RawData/Training/img" / f"img{n:04d}.nii.gz",
                  raw / "RawData/Training/label" / f"label{n:04d}.nii.gz", n)
    (raw / "RawData/Testing/img").mkdir(parents=True)  # unlabelled test images are ignored
    path = prepare_btcv(raw, tmp_path / "out")
    content = read(tmp_path / "out")
    assert [c["case"] for c in content["training"]] == [f"bcv_{n}" for n in (*range(1, 11), *range(21, 32))]
    assert [c["case"] for c in content["validation"]] == [f"bcv_{n}" for n in range(32, 41)]
    assert (content["numTraining"], content["numValidation"]) == (21, 9)
    assert content["labels"] == {str(i): name for i, name in enumerate(BTCV_LABELS)} and len(BTCV_LABELS) == 14
    assert content["modality"] == {"0": "CT"} and content["source"]["layout"] == "synapse RawData"
    first = content["training"][0]
    assert first["image"] == "../btcv/RawData/Training/img/img0001.nii.gz"  # relative to the datalist's folder
    assert (path.parent / first["label"]).is_file()
    properties = content["properties"]
    assert properties["target_spacing"] == pytest.approx([0.8, 0.8, 3.0])
    intensity = properties["intensity"]  # every 10th foreground voxel of all 30 cases: intensities 101..140
    assert 101 <= intensity["percentile_00_5"] < intensity["mean"] < intensity["percentile_99_5"] <= 140
    assert intensity["voxels"] == 30 and intensity["std"] > 0


@pytest.mark.parametrize("layout", ["nnunet", "imagesTr"])
def test_btcv_other_layouts_keep_the_official_assignment_of_a_subset(tmp_path, caplog, layout):
    raw = tmp_path / "Task060_BTCV"
    for n in (1, 2, 33):
        image, label = (f"bcv_{n}_0000.nii.gz", f"bcv_{n}.nii.gz") if layout == "nnunet" else \
            (f"img{n:04d}.nii.gz", f"label{n:04d}.nii.gz")
        case_pair(raw / "imagesTr" / image, raw / "labelsTr" / label, n)
    prepare_btcv(tmp_path, tmp_path / "out")  # the folder above the task folder works too
    content = read(tmp_path / "out")
    assert [c["case"] for c in content["training"]] == ["bcv_1", "bcv_2"]
    assert [c["case"] for c in content["validation"]] == ["bcv_33"]
    assert "27 case(s) of the official BTCV split are missing" in caplog.text


def test_vs_folders_reproduce_the_official_193_49_split(tmp_path):
    raw = tmp_path / "VS-SEG"
    for n in VS_CASES:
        case_pair(raw / f"vs_gk_{n}" / "vs_gk_t1_refT1.nii.gz", raw / f"vs_gk_{n}" / "vs_gk_seg_refT1.nii.gz", n,
                  spacing=(0.4, 0.4, 1.5))
    prepare_vs(tmp_path, tmp_path / "out")
    content = read(tmp_path / "out")
    assert (content["numTraining"], content["numValidation"]) == (193, 49) and len(VS_CASES) == 242
    train, validation = vs_official_split([f"vs_gk_{n}" for n in VS_CASES])  # the official converter's rule
    assert sorted(c["case"] for c in content["validation"]) == sorted(validation)
    assert sorted(c["case"] for c in content["training"]) == sorted(train)
    assert validation[:3] == ["vs_gk_92", "vs_gk_232", "vs_gk_163"]  # order of splits_final_VS.pkl
    assert content["labels"] == {"0": "background", "1": "vestibular schwannoma"}
    assert content["modality"] == {"0": "T1"} and "intensity" not in content["properties"]
    assert content["properties"]["target_spacing"] == pytest.approx([0.4, 0.4, 1.5])
    assert content["training"][0] == {"case": "vs_gk_1", "image": "../VS-SEG/vs_gk_1/vs_gk_t1_refT1.nii.gz",
                                      "label": "../VS-SEG/vs_gk_1/vs_gk_seg_refT1.nii.gz"}


def test_vs_nnunet_task_layout(tmp_path):
    raw = tmp_path / "Task061_VSseg"
    for n in (1, 2, VS_VALIDATION[0]):
        case_pair(raw / "imagesTr" / f"vs_gk_{n}_0000.nii.gz", raw / "labelsTr" / f"vs_gk_{n}.nii.gz", n)
    prepare_vs(raw, tmp_path / "out")
    content = read(tmp_path / "out")
    assert [c["case"] for c in content["training"]] == ["vs_gk_1", "vs_gk_2"]
    assert [c["case"] for c in content["validation"]] == [f"vs_gk_{VS_VALIDATION[0]}"]
    assert content["source"]["layout"] == "nnU-Net Task061"


def test_wrong_trees_get_errors_that_say_what_was_expected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match="does not look like BTCV.*RawData/Training/img/img0001.nii.gz.*"
                                                 "found nothing"):
        prepare_btcv(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(DatasetLayoutError, match="is not a folder"):
        prepare_vs(tmp_path / "missing", tmp_path / "out")

    btcv = tmp_path / "btcv" / "Training"
    case_pair(btcv / "img/img0001.nii.gz", btcv / "label/label0001.nii.gz", 1)
    case_pair(btcv / "img/img0032.nii.gz", btcv / "label/label0032.nii.gz", 32)
    with pytest.raises(DatasetLayoutError, match=r"vestibular schwannoma.*vs_gk_1/vs_gk_t1_refT1.nii.gz.*found "
                                                 r"Training/"):
        prepare_vs(tmp_path / "btcv", tmp_path / "out")
    (btcv / "label/label0032.nii.gz").unlink()
    with pytest.raises(DatasetLayoutError, match=r"have no label map \(case numbers \[32\]\)"):
        prepare_btcv(tmp_path / "btcv", tmp_path / "out")
    case_pair(btcv / "img/img0032.nii.gz", btcv / "label/label0032.nii.gz", 32)
    case_pair(btcv / "img/img0061.nii.gz", btcv / "label/label0061.nii.gz", 61)
    with pytest.raises(DatasetLayoutError, match=r"cases \[61\] outside BTCV's 30 labelled training cases"):
        prepare_btcv(tmp_path / "btcv", tmp_path / "out")
    for n in (32, 61):
        (btcv / f"img/img{n:04d}.nii.gz").unlink()
        (btcv / f"label/label{n:04d}.nii.gz").unlink()
    with pytest.raises(DatasetLayoutError, match="no case of the official validation split"):
        prepare_btcv(tmp_path / "btcv", tmp_path / "out")

    vs = tmp_path / "vs" / "vs_gk_1"
    vs.mkdir(parents=True)
    (vs / "vs_gk_t2_refT2.nii.gz").touch()
    with pytest.raises(DatasetLayoutError, match="none holds vs_gk_t1_refT1.nii.gz"):
        prepare_vs(tmp_path / "vs", tmp_path / "out")


def test_prepare_returns_data_and_the_command_prints_it(tmp_path, capsys):
    raw = tmp_path / "RawData" / "Training"
    for n in (1, 32):
        case_pair(raw / f"img/img{n:04d}.nii.gz", raw / f"label/label{n:04d}.nii.gz", n)
    result = prepare("btcv", str(tmp_path), str(tmp_path / "out"))
    assert capsys.readouterr() == ("", "")  # the library prints nothing
    assert result["training"] == 1 and result["validation"] == 1 and result["layout"] == "synapse RawData"
    with pytest.raises(UnisegHubError, match="already exists; pass overwrite=True"):
        prepare("btcv", str(tmp_path), str(tmp_path / "out"))
    main(["prepare", "BTCV", str(tmp_path), str(tmp_path / "out"), "--overwrite"])
    printed = capsys.readouterr()
    assert "1 training / 1 validation cases (synapse RawData layout), target spacing [0.8, 0.8, 3.0] mm" in printed.out
    assert printed.err.startswith("warning: 28 case(s) of the official BTCV split are missing (bcv_2, ")
    assert len(printed.err.splitlines()) == 1
    main(["prepare", "btcv", str(tmp_path), str(tmp_path / "out"), "--overwrite", "--json"])
    assert json.loads(capsys.readouterr().out)["training"] == 1
    with pytest.raises(SystemExit) as exit_status:
        main(["prepare", "lits", str(tmp_path), str(tmp_path / "out2")])
    assert exit_status.value.code == 1
    assert "prepare knows: btcv, vs" in capsys.readouterr().err


def test_target_spacing_follows_nnunet_v1():
    assert target_spacing([[1, 1, 1], [1, 1, 2], [2, 2, 2]], [[100] * 3] * 3) == [1, 1, 2]
    spacings = [[0.7, 0.7, z] for z in (2.5, 2.5, 3.0, 3.0, 3.0, 5.0, 5.0, 5.0, 5.0, 5.0)]
    shapes = [[512, 512, 100]] * 10  # 3 mm slices, 4x the in-plane spacing and few slices: anisotropic
    assert target_spacing(spacings, shapes) == pytest.approx([0.7, 0.7, 2.5])
