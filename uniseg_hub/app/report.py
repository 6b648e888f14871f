"""What a person looks at after a prediction: label volumes in millilitres and a PNG preview.

Both take arrays and the voxel-to-world affine: the label map as the bundle wrote it (in memory: the values and
grid of the file a viewer such as 3D Slicer opens) and the input scan as it was loaded; nothing is read back from
disk. Files are written atomically.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: render to files only

import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from scipy import ndimage  # noqa: E402

from ..files import atomic_path, write_text_atomic  # noqa: E402

PREVIEW_SIZE = (1500, 560)
"""Width and height of the preview PNG in pixels."""

_DPI = 100
_COLOURS = plt.get_cmap("tab20").colors


def label_colour(value: int):
    """A fixed colour per label value, the same in every preview."""
    return _COLOURS[(value - 1) % len(_COLOURS)]


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


def render_preview(image, labels, affine, label_names: Mapping[int, str], png_path: str | Path,
                   title: str = "") -> dict:
    """Axial, coronal and sagittal slices through the largest segmented structure, labels overlaid, with a legend.

    ``image``: the scan, (x, y, z) or channel-first (C, x, y, z) (the first channel is shown); ``labels``: the label
    map on the same grid, (x, y, z) or (1, x, y, z); ``affine``: their voxel-to-world matrix. Both are shown in the
    closest canonical (RAS) orientation, with the voxel spacing as aspect ratio. Returns what was drawn (slice
    indices, focused label, labels shown).
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
    low, high = np.percentile(data, [1, 99]) if data.size else (0, 1)
    present = [int(v) for v in np.unique(labels) if v > 0]
    colours = ListedColormap([(0, 0, 0, 0)] + [(*label_colour(v)[:3], 1.0) for v in range(1, max(present + [1]) + 1)])
    views = [("axial", data[:, :, z].T, labels[:, :, z].T, zooms[1] / zooms[0]),
             ("coronal", data[:, y, :].T, labels[:, y, :].T, zooms[2] / zooms[0]),
             ("sagittal", data[x, :, :].T, labels[x, :, :].T, zooms[2] / zooms[1])]
    figure, axes = plt.subplots(1, 3, figsize=(PREVIEW_SIZE[0] / _DPI, PREVIEW_SIZE[1] / _DPI), dpi=_DPI)
    for ax, (name, background, overlay, aspect) in zip(axes, views):
        ax.imshow(background, cmap="gray", vmin=low, vmax=high, origin="lower", aspect=aspect)
        ax.imshow(np.ma.masked_equal(overlay, 0), cmap=colours, vmin=0, vmax=colours.N - 1, alpha=0.5,
                  origin="lower", aspect=aspect, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    handles = [Patch(color=label_colour(v), label=f"{v}: {label_names.get(v, '?')}") for v in present]
    if handles:
        figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False)
    else:
        figure.text(0.5, 0.04, "no structure segmented", ha="center")
    figure.suptitle(title)
    figure.subplots_adjust(left=0.01, right=0.99, top=0.88, bottom=0.12, wspace=0.02)
    with atomic_path(png_path, suffix=".png") as tmp:
        figure.savefig(tmp, dpi=_DPI, format="png")
    plt.close(figure)
    return {"slices": {"x": x, "y": y, "z": z}, "focus_label": focus, "labels_shown": present}
