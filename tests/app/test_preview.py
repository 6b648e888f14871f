"""The preview PNG, read back pixel by pixel: the window applied, each label's colour where the label is, the
patient's right where the R is, a legend inside the picture, and the title of a real prediction."""

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest
from dicom_series import write_series

from uniseg_hub.app import report
from uniseg_hub.app.predict import predict
from uniseg_hub.app.report import (
    OVERLAY_ALPHA,
    PREVIEW_SIZE,
    SOFT_TISSUE,
    display_window,
    preview_title,
    render_preview,
)
from uniseg_hub.errors import ConfigError
from uniseg_hub.palette import PALETTE
from uniseg_hub.pipeline.label_files import model_version
from uniseg_hub.tasks import get_task, merged_label_names

from scans import crop, sample

SHAPE = (40, 30, 20)
RAS = np.diag([1.5, 1.5, 3.0, 1.0])


def phantom():
    """Air (-1000 HU) around a soft-tissue body (40 HU) with a bone block (1000 HU); label 1 (liver) in the
    patient's right half of the body (high x in RAS), label 2 (liver tumour) in the left half."""
    image = np.full(SHAPE, -1000.0, np.float32)
    image[5:35, 5:25, :] = 40.0
    image[17:23, 12:18, :] = 1000.0
    labels = np.zeros(SHAPE, np.uint8)
    labels[26:33, 8:22, 4:16] = 1  # the largest structure: the preview cuts through it
    labels[7:11, 8:12, 8:12] = 2
    return image, labels


def pixel(info, view, horizontal, vertical, size):
    """PNG (row, column) of the centre of the displayed plane's cell (horizontal, vertical) of ``size``
    (columns, rows), from the view's box."""
    left, top, right, bottom = info["views"][view]["box"]
    column = left + (horizontal + 0.5) * (right - left) / size[0]
    row = bottom - (vertical + 0.5) * (bottom - top) / size[1]
    return int(row), int(column)


def axial(png, info, x, y):
    """The axial view's colour at RAS voxel (x, y): radiological, so x runs from the right of the picture."""
    row, column = pixel(info, "axial", SHAPE[0] - 1 - x, y, (SHAPE[0], SHAPE[1]))
    return png[row, column, :3]


@pytest.fixture
def drawn(tmp_path):
    image, labels = phantom()
    png = tmp_path / "preview.png"
    info = render_preview(image, labels, RAS, get_task("liver").label_names, png, title="case | liver | m",
                          window="ct")
    return mpimg.imread(png), info


def test_ct_is_shown_in_the_soft_tissue_window_with_label_colours_where_the_labels_are(drawn):
    png, info = drawn
    assert png.shape[:2] == (PREVIEW_SIZE[1], PREVIEW_SIZE[0]) and info["window"] == SOFT_TISSUE == (-160, 240)
    z = info["slices"]["z"]
    assert 4 <= z < 16 and info["labels_shown"] == [1, 2]
    tissue = 0.5  # 40 HU in the window of level 40, width 400: mid grey
    np.testing.assert_allclose(axial(png, info, 2, 2), 0, atol=0.02)  # air: black
    np.testing.assert_allclose(axial(png, info, 12, 22), tissue, atol=0.02)  # soft tissue, no label: grey
    np.testing.assert_allclose(axial(png, info, 20, 15), 1, atol=0.02)  # bone above the window: white
    for (x, y), value in (((29, 15), 1), ((9, 10), 2)):
        colour = np.array(PALETTE[value - 1]) / 255  # liver and liver tumour: the first two structures
        expected = OVERLAY_ALPHA * colour + (1 - OVERLAY_ALPHA) * tissue
        np.testing.assert_allclose(axial(png, info, x, y), expected, atol=0.02)


def test_the_patients_right_is_where_the_r_is_whatever_the_storage_order(drawn, tmp_path):
    png, info = drawn
    assert info["views"]["axial"]["letters"] == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    assert info["views"]["coronal"]["letters"] == {"left": "R", "right": "L", "top": "S", "bottom": "I"}
    assert info["views"]["sagittal"]["letters"] == {"left": "A", "right": "P", "top": "S", "bottom": "I"}
    # liver (label 1, patient's right) is in the left half of the axial view, the tumour in the right half
    left, _, right, _ = info["views"]["axial"]["box"]
    liver = np.array(PALETTE[0]) / 255
    red = np.all(np.abs(png[:, :, :3] - (OVERLAY_ALPHA * liver + (1 - OVERLAY_ALPHA) * 0.5)) < 0.02, axis=2)
    columns = np.nonzero(red[:, int(left):int(right)].any(axis=0))[0] + int(left)
    assert columns.size and columns.max() < (left + right) / 2
    # the same scan stored left-posterior (array axes reversed, affine flipped) gives the same picture
    image, labels = phantom()
    flip = RAS @ np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:3, 3] = RAS[:3, :3] @ (np.array(SHAPE) - 1) * [1, 1, 0]
    other = tmp_path / "flipped.png"
    render_preview(image[::-1, ::-1], labels[::-1, ::-1], flip, get_task("liver").label_names, other,
                   title="case | liver | m", window="ct")
    np.testing.assert_array_equal(mpimg.imread(other), png)


def test_mr_is_shown_between_percentiles(tmp_path):
    image, labels = phantom()
    image = np.where(image < 0, 0.0, image + 100.0)  # MR-like: zero background, arbitrary units
    info = render_preview(image, labels, RAS, get_task("prostate").label_names, tmp_path / "mr.png")
    body = image[image != 0]
    assert info["window"] == pytest.approx(tuple(np.percentile(body, [1, 99])))
    png = mpimg.imread(tmp_path / "mr.png")
    low, high = info["window"]
    np.testing.assert_allclose(axial(png, info, 12, 22), (140 - low) / (high - low), atol=0.02)


def test_the_window_is_checked():
    assert display_window(np.zeros(3), (0, 5)) == (0.0, 5.0)
    for bad in ("soft", (5, 0), (1,)):
        with pytest.raises(ConfigError, match="window"):
            display_window(np.zeros(3), bad)


def test_the_legend_of_all_seventeen_labels_fits_beside_the_views(tmp_path):
    image, _ = phantom()
    labels = np.zeros(SHAPE, np.uint8)
    for value in range(1, 18):
        labels[2 * value: 2 * value + 2, 5:25, 5:15] = value
    info = render_preview(image, labels, RAS, merged_label_names(), tmp_path / "all.png", window="ct")
    assert info["labels_shown"] == list(range(1, 18))
    left, top, right, bottom = info["legend"]["box"]
    assert 0 <= top and bottom <= PREVIEW_SIZE[1] and right <= PREVIEW_SIZE[0], info["legend"]
    assert all(left >= view["box"][2] for view in info["views"].values())  # beside the views, not over them
    # every label's colour appears in the legend's swatches
    png = mpimg.imread(tmp_path / "all.png")[int(top):int(bottom), int(left):int(right), :3]
    for colour in PALETTE[:17]:
        assert np.any(np.all(np.abs(png - np.array(colour) / 255) < 0.01, axis=2)), colour


def test_a_legend_of_long_names_is_shortened_rather_than_clipped(tmp_path):
    image, _ = phantom()
    labels = np.zeros(SHAPE, np.uint8)
    for value in range(1, 19):
        labels[2 * value: 2 * value + 2, 5:25, 5:15] = value
    names = {0: "background", **{v: f"structure {v} " + "with a very long descriptive name " * 3 for v in range(1, 19)}}
    title = "a-case-with-a-very-long-name-" * 8 + "  |  task: all  |  model: a-fine-tuned-model-folder"
    info = render_preview(image, labels, RAS, names, tmp_path / "long.png", title=title, window="ct")
    title_left, _, title_right, _ = info["title"]["box"]
    assert 0 <= title_left and title_right <= PREVIEW_SIZE[0] and info["title"]["text"].startswith("a-case-with")
    left, top, right, bottom = info["legend"]["box"]
    assert 0 <= top and bottom <= PREVIEW_SIZE[1] and right <= PREVIEW_SIZE[0], info["legend"]
    assert all(left >= view["box"][2] for view in info["views"].values())


def test_the_model_version_names_the_weights():
    class Model:
        pretrained_cfg = {"name": "uniseg-11task", "revision": "0123456789abcdef"}

    assert model_version(Model()) == "uniseg-11task@0123456"
    Model.pretrained_cfg = {"weights": "model.safetensors", "source": {"sha256": "abcdef0123"}}
    assert model_version(Model(), "/x/uniseg-small/") == "uniseg-small (sha256 abcdef01)"
    assert preview_title("/data/SCAN.NII.GZ", "liver", Model(), "/x/uniseg-small") == \
        "SCAN  |  task: liver  |  model: uniseg-small (sha256 abcdef01)"


def test_a_dicom_prediction_shows_the_windowed_scan_under_a_titled_preview(converted_small, tmp_path, monkeypatch):
    pytest.importorskip("itk")
    ct = crop(sample("ct_small"), tmp_path / "abdomen.nii.gz", (slice(20, 60), slice(30, 70), slice(8, 24)))
    series = write_series(ct, tmp_path / "series")
    drawn = {}
    real = report.render_preview
    monkeypatch.setattr(report, "render_preview",
                        lambda *a, **k: drawn.update(kwargs=k, info=real(*a, **k)) or drawn["info"])
    result = predict(series, task="spleen", out_dir=str(tmp_path / "out"), weights=str(converted_small), tta=False,
                     progress=False)
    assert drawn["kwargs"]["title"].startswith("series  |  task: spleen  |  model: uniseg-small (sha256 ")
    assert drawn["kwargs"]["window"] == "ct"
    info, png = drawn["info"], mpimg.imread(result.preview)
    # the background is the series in the soft-tissue window where nothing is labelled
    scan = nib.as_closest_canonical(nib.load(ct))
    values = np.asanyarray(scan.dataobj).astype(np.float32)
    labels = np.asanyarray(nib.as_closest_canonical(nib.load(result.label_map)).dataobj)
    z = info["slices"]["z"]
    grey = np.clip((values[:, :, z] - SOFT_TISSUE[0]) / (SOFT_TISSUE[1] - SOFT_TISSUE[0]), 0, 1)
    size = values.shape[:2]
    checked = 0
    for x in range(3, size[0] - 3):  # the orientation letters sit at the edges
        for y in range(3, size[1] - 3):
            if labels[x, y, z] == 0:
                row, column = pixel(info, "axial", size[0] - 1 - x, y, size)
                np.testing.assert_allclose(png[row, column, :3], grey[x, y], atol=0.02, err_msg=str((x, y)))
                checked += 1
    assert checked > 100
