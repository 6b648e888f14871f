"""What a person looks at after a prediction: label volumes in millilitres and a PNG preview.

The preview shows CT in a soft-tissue window and MR/PET between percentiles, in radiological orientation (the
patient's right on the left of the axial and coronal views, anterior on the left of the sagittal view) with the
orientation letters on each view, each label in its structure's colour (``palette``), a legend beside the views
that is fitted to the figure, and a title (case, task, model).

Both take arrays and the voxel-to-world affine: the label map as the bundle wrote it (in memory: the values and
grid of the file a viewer such as 3D Slicer opens) and the input scan as it was loaded; nothing is read back from
disk. Files are written atomically.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: render to files only

import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import patheffects  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from scipy import ndimage  # noqa: E402

from ..errors import ConfigError  # noqa: E402
from ..files import atomic_path, write_text_atomic  # noqa: E402
from ..palette import colour, segments  # noqa: E402
from ..tasks import Task  # noqa: E402

PREVIEW_SIZE = (1500, 560)
"""Width and height of the preview PNG in pixels."""

_DPI = 100

SOFT_TISSUE = (-160.0, 240.0)
"""The CT soft-tissue window (level 40 HU, width 400 HU) the preview shows CT in."""

PERCENTILES = (1.0, 99.0)
"""MR and PET are shown between these percentiles of their non-zero voxels."""

OVERLAY_ALPHA = 0.5
"""Opacity of the label colours over the scan."""


def label_volumes(labels, affine, label_names: Mapping[int, str]) -> list[dict]:
    """Voxel count and volume in mL of every foreground label (absent labels included with 0).

    ``labels``: the (x, y, z) label map (or (1, x, y, z)), integer values; ``affine``: its voxel-to-world matrix
    in millimetres (the voxel volume is its determinant).
    """
    labels = np.asarray(labels)
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
    counts = np.bincount(labels.reshape(-1).astype(np.int64), minlength=max(label_names) + 1)
    return [{"label": int(v), "name": n, "voxels": int(counts[v]), "volume_ml": round(float(counts[v]) * voxel_ml, 3)}
            for v, n in sorted(label_names.items()) if v != 0]


def write_volume_tables(rows: list[dict], json_path: Path, csv_path: Path) -> None:
    """The volume table as JSON and CSV."""
    write_text_atomic(json_path, json.dumps(rows, indent=2) + "\n")
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["label", "name", "voxels", "volume_ml"])
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(csv_path, text.getvalue())


def _focus(labels: np.ndarray) -> tuple[tuple[int, int, int], int | None]:
    """Centre of the largest connected structure (any label), and its label; the volume centre if none."""
    values, counts = np.unique(labels[labels > 0], return_counts=True)
    if not len(values):
        return tuple(s // 2 for s in labels.shape), None
    best = None
    for value in values[np.argsort(counts)[::-1][:4]]:  # the largest component is in one of the biggest labels
        components, n = ndimage.label(labels == value)
        sizes = np.bincount(components.reshape(-1))[1:]
        if n and (best is None or sizes.max() > best[0]):
            best = (sizes.max(), value, components == (int(np.argmax(sizes)) + 1))
    centre = ndimage.center_of_mass(best[2])
    return tuple(int(round(c)) for c in centre), int(best[1])


def canonical(array: np.ndarray, affine) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The (x, y, z) ``array`` in the closest canonical (RAS) orientation (a view: axes swapped and flipped), and
    its voxel spacing in that orientation, from the voxel-to-world ``affine`` (as ``nib.as_closest_canonical``)."""
    affine = np.asarray(affine, dtype=np.float64)
    orientation = nib.orientations.io_orientation(affine)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    zooms = np.empty(3)
    zooms[orientation[:, 0].astype(int)] = spacing
    return nib.orientations.apply_orientation(array, orientation), tuple(float(z) for z in zooms)


def display_window(image: np.ndarray, window) -> tuple[float, float]:
    """The (low, high) values shown black and white: ``"ct"`` the soft-tissue window, ``"percentile"`` the
    ``PERCENTILES`` of the non-zero finite voxels (all finite voxels if none is non-zero), or a (low, high) pair."""
    if isinstance(window, str) and window.lower() == "ct":
        return SOFT_TISSUE
    if isinstance(window, str) and window.lower() == "percentile":
        finite = image[np.isfinite(image)]
        values = finite[finite != 0] if np.any(finite != 0) else finite
        if not values.size:
            return 0.0, 1.0
        low, high = (float(v) for v in np.percentile(values, PERCENTILES))
        return (low, high) if high > low else (low, low + 1.0)
    if isinstance(window, (tuple, list)) and len(window) == 2 and float(window[1]) > float(window[0]):
        return float(window[0]), float(window[1])
    raise ConfigError(f"the preview window must be 'ct', 'percentile' or (low, high) with low < high, got {window!r}")


VIEWS = (("axial", 2, 0, 1, True), ("coronal", 1, 0, 2, True), ("sagittal", 0, 1, 2, True))
"""(name, the axis cut, the horizontal axis, the vertical axis, horizontal axis reversed) of each view, in RAS
voxel axes: reversed, the left of the picture is the positive (R, A) side, as radiologists read them."""

_POSITIVE, _NEGATIVE = "RAS", "LPI"


def view_letters(horizontal: int, vertical: int, reversed_horizontal: bool) -> dict[str, str]:
    """The orientation letters at the edges of a view (left, right, top, bottom) of RAS voxel axes."""
    left, right = (_POSITIVE, _NEGATIVE) if reversed_horizontal else (_NEGATIVE, _POSITIVE)
    return {"left": left[horizontal], "right": right[horizontal], "top": _POSITIVE[vertical],
            "bottom": _NEGATIVE[vertical]}


def _plane(volume: np.ndarray, cut: int, index: int, horizontal: int, reverse: bool) -> np.ndarray:
    """The slice ``index`` across axis ``cut`` as (rows = vertical axis, columns = horizontal axis)."""
    plane = np.take(volume, index, axis=cut)
    rest = [a for a in range(3) if a != cut]
    plane = plane if rest[0] == horizontal else plane.T  # (horizontal, vertical)
    plane = plane.T  # rows: vertical (drawn with origin="lower"), columns: horizontal
    return plane[:, ::-1] if reverse else plane


def _shorten(text: str, length: int | None) -> str:
    return text if length is None or len(text) <= length else text[: length - 1] + "\u2026"


def _fit_legend(area, entries, renderer):
    """A legend of ``entries`` ((colour, text) pairs) in the ``area`` axes, in the largest font (and fewest columns)
    that keeps it inside them; names are shortened (with an ellipsis) only if even the smallest font does not fit."""
    box = area.get_window_extent(renderer)
    legend = None
    for length in (None, 40, 24, 12):
        handles = [Patch(facecolor=colour, edgecolor="white", label=_shorten(text, length))
                   for colour, text in entries]
        for columns in (1, 2):
            for size in (12, 11, 10, 9, 8, 7, 6):
                if legend is not None:
                    legend.remove()
                legend = area.legend(handles=handles, loc="upper left", bbox_to_anchor=(0, 1), ncol=columns,
                                     fontsize=size, frameon=False, borderaxespad=0, handlelength=1.2,
                                     columnspacing=0.8, labelspacing=0.4)
                extent = legend.get_window_extent(renderer)
                if extent.x0 >= box.x0 - 1 and extent.x1 <= box.x1 + 1 and extent.y0 >= box.y0 - 1 and \
                        extent.y1 <= box.y1 + 1:
                    return legend, size
    return legend, size


def render_preview(image, labels, affine, label_names: Mapping[int, str], png_path: str | Path,
                   title: str = "", window="percentile", tasks: Sequence[Task] = ()) -> dict:
    """Axial, coronal and sagittal slices through the largest segmented structure, labels overlaid, with a legend.

    ``image``: the scan, (x, y, z) or channel-first (C, x, y, z) (the first channel is shown); ``labels``: the label
    map on the same grid, (x, y, z) or (1, x, y, z); ``affine``: their voxel-to-world matrix; ``window``: ``"ct"``
    (soft tissue), ``"percentile"`` (MR, PET) or (low, high) (``display_window``). Both are shown in the closest
    canonical (RAS) orientation, drawn radiologically (``VIEWS``), with the voxel spacing as aspect ratio. Returns
    what was drawn: slice indices, focused label, labels shown, the window, and per view its letters and its box
    in the PNG's pixels (left, top, right, bottom), and the legend's box and font size. ``tasks``: whose map
    ``labels`` is, for the colours (``palette.segments``).
    """
    image, labels = np.asarray(image), np.asarray(labels)
    image = image[0] if image.ndim == 4 else image
    labels = labels[0] if labels.ndim == 4 else labels
    if image.shape != labels.shape:
        raise ValueError(f"the image {image.shape} and the label map {labels.shape} must share one grid")
    data, _ = canonical(image, affine)
    data = data.astype(np.float32)
    labels, zooms = canonical(labels.astype(np.int64), affine)
    (x, y, z), focus = _focus(labels)
    low, high = display_window(data, window)
    present = [int(v) for v in np.unique(labels) if v > 0]
    # each label in its colour (palette.segments: the same in every file), a value no name covers by its value
    colours = {s.value: s.colour_float for s in segments(label_names, tasks)}
    colours.update({v: tuple(c / 255.0 for c in colour(v)) for v in present if v not in colours})
    lut = np.zeros((max(present + [0]) + 1, 4))
    for v in present:
        lut[v] = (*colours[v], OVERLAY_ALPHA)
    grey = np.clip((np.nan_to_num(data, nan=low) - low) / (high - low), 0, 1)
    width, height = PREVIEW_SIZE
    figure = plt.figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, facecolor="black")
    views = {}
    for i, (name, cut, horizontal, vertical, reverse) in enumerate(VIEWS):
        index = (x, y, z)[cut]
        ax = figure.add_axes((0.005 + i * 0.255, 0.03, 0.25, 0.83), facecolor="black")
        background = _plane(grey, cut, index, horizontal, reverse)
        overlay = lut[_plane(labels, cut, index, horizontal, reverse)]
        aspect = zooms[vertical] / zooms[horizontal]
        ax.imshow(background, cmap="gray", vmin=0, vmax=1, origin="lower", aspect=aspect, interpolation="nearest")
        ax.imshow(overlay, origin="lower", aspect=aspect, interpolation="nearest")
        ax.set_axis_off()
        letters = view_letters(horizontal, vertical, reverse)
        outline = [patheffects.withStroke(linewidth=3, foreground="black")]
        for side, (px, py, ha, va) in {"left": (0.015, 0.5, "left", "center"), "right": (0.985, 0.5, "right", "center"),
                                       "top": (0.5, 0.985, "center", "top"),
                                       "bottom": (0.5, 0.015, "center", "bottom")}.items():
            ax.text(px, py, letters[side], transform=ax.transAxes, ha=ha, va=va, color="#ffd400", fontsize=13,
                    fontweight="bold", path_effects=outline)
        ax.text(0.5, -0.01, f"{name} {index + 1}/{data.shape[cut]}", transform=ax.transAxes, ha="center", va="top",
                color="white", fontsize=10)
        views[name] = {"ax": ax, "letters": letters, "index": index}
    area = figure.add_axes((0.775, 0.03, 0.22, 0.83))
    area.set_axis_off()
    entries = [(colours[v], f"{v}: {label_names.get(v, '?')}") for v in present]
    renderer = figure.canvas.get_renderer()
    legend, font = None, None
    if entries:
        legend, font = _fit_legend(area, entries, renderer)
        for text in legend.get_texts():
            text.set_color("white")
    else:
        area.text(0, 1, "no structure segmented", va="top", color="white", fontsize=12, transform=area.transAxes)
    heading = figure.suptitle(title, color="white", fontsize=13)
    for size in (12, 11, 10, 9, 8, 7, 6):  # a long case name or model: a smaller title, never a clipped one
        if heading.get_window_extent(renderer).width <= width - 10:
            break
        heading.set_fontsize(size)
    else:
        heading.set_text(_shorten(title, int(len(title) * (width - 10) / heading.get_window_extent(renderer).width)))
    figure.canvas.draw()

    def pixels(artist) -> tuple[float, float, float, float]:
        box = artist.get_window_extent(renderer)
        return (float(box.x0), float(height - box.y1), float(box.x1), float(height - box.y0))

    drawn = {name: {"letters": v["letters"], "box": pixels(v["ax"]), "index": v["index"]} for name, v in views.items()}
    with atomic_path(png_path, suffix=".png") as tmp:
        figure.savefig(tmp, dpi=_DPI, format="png", facecolor="black")
    result = {"slices": {"x": x, "y": y, "z": z}, "focus_label": focus, "labels_shown": present,
              "window": (float(low), float(high)), "views": drawn,
              "legend": None if legend is None else {"box": pixels(legend), "fontsize": font},
              "title": {"text": heading.get_text(), "box": pixels(heading)}}
    plt.close(figure)
    return result


def preview_title(first_input, task: str, model, source: str = "") -> str:
    """The preview's title: the case, the task and the model version (``pipeline.label_files.model_version``)."""
    from ..pipeline.cases import output_case_name
    from ..pipeline.label_files import model_version

    return f"{output_case_name(first_input)}  |  task: {task}  |  model: {model_version(model, source)}"
