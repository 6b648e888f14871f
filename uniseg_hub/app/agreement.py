"""Agreement of a UniSeg label map with TotalSegmentator's label map of the same scan (Dice per organ).

The sample scans (``sample_data``) come with TotalSegmentator's label maps. Where a UniSeg task segments an organ
those maps contain, the Dice between the two says at a glance whether the weights work: a broken download or a
wrong preprocessing gives a Dice near 0, working weights a high one. TotalSegmentator's maps are predictions of
another model, not manual ground truth: the figure is agreement, not accuracy.

Which labels are compared (``ORGANS``):

* UniSeg's organ label of the task (label 1 of liver, kidney, pancreas, spleen and prostate); the task's tumour
  label is not counted as organ;
* in the all-tasks map, the same label under its merged value (``Task.merged_labels``: liver 1, kidney 3,
  pancreas 7, spleen 11);
* TotalSegmentator's classes of that organ, by name (``TOTALSEGMENTATOR_CLASSES``): both kidneys, with their
  cysts (KiTS19, UniSeg's kidney data, counts cysts as kidney), as one organ.

The reference map is taken onto the label map's grid through the affines (nearest neighbour, MONAI's
``ResampleToMatch``) unless both share one grid; the Dice is MONAI's ``compute_dice``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import InputError
from ..tasks import Task, get_task, tasks_in_group

TOTALSEGMENTATOR_CLASSES: dict[str, dict[str, int]] = {
    # class name -> label value, from totalsegmentator/map_to_binary.py (class_map) of totalsegmentator 2.18.0
    "total": {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "pancreas": 7, "prostate": 22,
              "kidney_cyst_left": 23, "kidney_cyst_right": 24},
    "total_mr": {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "pancreas": 7, "prostate": 17},
}
"""The TotalSegmentator classes ``ORGANS`` uses, per label scheme (``total``: CT, ``total_mr``: MR)."""


@dataclass(frozen=True)
class Organ:
    """An organ a UniSeg task segments and TotalSegmentator's maps contain.

    Attributes:
        task: the UniSeg task's name.
        name: the organ.
        label: the organ's label value in the task's own label map (1-based).
        classes: TotalSegmentator's class names that together make the organ (absent ones are skipped per scheme).
    """

    task: str
    name: str
    label: int
    classes: tuple[str, ...]


ORGANS: tuple[Organ, ...] = (
    Organ("liver", "liver", 1, ("liver",)),
    Organ("kidney", "kidney", 1, ("kidney_left", "kidney_right", "kidney_cyst_left", "kidney_cyst_right")),
    Organ("pancreas", "pancreas", 1, ("pancreas",)),
    Organ("spleen", "spleen", 1, ("spleen",)),
    Organ("prostate", "prostate", 1, ("prostate",)),
)


@dataclass(frozen=True)
class Agreement:
    """The Dice of one organ between a UniSeg label map and TotalSegmentator's map of the same scan.

    ``dice`` is None when TotalSegmentator's map does not contain the organ (nothing to agree with); the volumes
    are in millilitres on the label map's grid.
    """

    case: str
    task: str
    organ: str
    dice: float | None
    volume_ml: float
    reference_volume_ml: float

    def as_dict(self) -> dict:
        return asdict(self)


def organ_values(task: str | int | Task, group: str = "CT") -> list[tuple[Organ, int]]:
    """The organs of ``ORGANS`` that a label map of ``task`` holds, each with its value in that map.

    ``task`` is a task (its own labels) or ``"all"``: the all-tasks map of ``group``, with the merged values.
    """
    if str(task).strip().lower() == "all":
        chosen, merged = tasks_in_group(group), True
    else:
        chosen, merged = (get_task(task),), False
    found = []
    for t in chosen:
        for organ in ORGANS:
            if organ.task == t.name:
                found.append((organ, t.merged_labels[organ.label - 1] if merged else organ.label))
    return found


def reference_values(organ: Organ, scheme: str = "total") -> list[int]:
    """TotalSegmentator's label values that make ``organ`` in the label scheme ``scheme``."""
    if scheme not in TOTALSEGMENTATOR_CLASSES:
        raise InputError(f"unknown TotalSegmentator label scheme {scheme!r}; the schemes are: "
                         + ", ".join(TOTALSEGMENTATOR_CLASSES))
    classes = TOTALSEGMENTATOR_CLASSES[scheme]
    return [classes[name] for name in organ.classes if name in classes]


def dice(prediction: np.ndarray, reference: np.ndarray) -> float | None:
    """Dice of two boolean masks of one shape (MONAI's ``compute_dice``); None when the reference is empty."""
    import torch
    from monai.metrics import compute_dice

    if not reference.any():
        return None
    as_batch = lambda mask: torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]  # noqa: E731
    return float(compute_dice(as_batch(prediction), as_batch(reference), include_background=True)[0, 0])


def same_grid(shape: Sequence[int], affine, other_shape: Sequence[int], other_affine, atol: float = 1e-3) -> bool:
    """Whether two label maps share one voxel grid (shape, and affine within ``atol`` mm)."""
    return tuple(shape) == tuple(other_shape) and np.allclose(np.asarray(affine, float),
                                                              np.asarray(other_affine, float), atol=atol)


def align(reference: np.ndarray, reference_affine, shape: Sequence[int], affine) -> np.ndarray:
    """``reference`` (a label map with its voxel-to-world affine) on the grid of (``shape``, ``affine``): as is
    when the grids are the same, else resampled through the affines with nearest neighbour (MONAI's
    ``ResampleToMatch``; outside the reference's field of view: 0)."""
    if same_grid(reference.shape, reference_affine, shape, affine):
        return np.asarray(reference)
    import torch
    from monai.data import MetaTensor
    from monai.transforms import ResampleToMatch

    source = MetaTensor(torch.from_numpy(np.asarray(reference, dtype=np.float32))[None],
                        affine=torch.as_tensor(np.asarray(reference_affine, float)))
    target = MetaTensor(torch.zeros((1, *shape)), affine=torch.as_tensor(np.asarray(affine, float)))
    moved = ResampleToMatch(mode="nearest", padding_mode="zeros")(source, target)
    return np.rint(np.asarray(moved.detach().cpu()[0])).astype(np.int64)


def agreement(labels: np.ndarray, affine, reference: np.ndarray, reference_affine, task: str | int,
              case: str = "", group: str = "CT", scheme: str = "total") -> list[Agreement]:
    """Dice per organ of a UniSeg label map against TotalSegmentator's map of the same scan.

    Args:
        labels: the UniSeg label map, (x, y, z), with its voxel-to-world ``affine``.
        reference: TotalSegmentator's label map, (x, y, z), with ``reference_affine`` (any grid over the scan).
        task: the task the label map is of, or ``"all"`` for the all-tasks map (of ``group``).
        case: the case's name, carried into the rows.
        scheme: TotalSegmentator's label scheme of ``reference``: ``total`` (CT) or ``total_mr`` (MR).

    Returns one ``Agreement`` per organ the task segments (none for tasks without a TotalSegmentator organ).
    """
    labels = np.asarray(labels)
    if labels.ndim != 3 or np.asarray(reference).ndim != 3:
        raise InputError(f"label maps must be 3D; got {labels.shape} and {np.asarray(reference).shape}")
    organs = organ_values(task, group)
    if not organs:
        return []
    moved = align(np.asarray(reference), reference_affine, labels.shape, affine)
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine, float)[:3, :3]))) / 1000.0
    name = "all" if str(task).strip().lower() == "all" else get_task(task).name
    rows = []
    for organ, value in organs:
        ours, theirs = labels == value, np.isin(moved, reference_values(organ, scheme))
        rows.append(Agreement(case=case, task=name, organ=organ.name, dice=dice(ours, theirs),
                              volume_ml=round(float(ours.sum()) * voxel_ml, 3),
                              reference_volume_ml=round(float(theirs.sum()) * voxel_ml, 3)))
    return rows


def agreement_files(label_map: str, reference: str, task: str | int, case: str = "", group: str = "CT",
                    scheme: str = "total") -> list[Agreement]:
    """``agreement`` of two NIfTI files (the label map ``predict`` wrote, TotalSegmentator's map)."""
    import nibabel as nib

    ours, theirs = nib.load(label_map), nib.load(reference)
    return agreement(np.asanyarray(ours.dataobj), ours.affine, np.asanyarray(theirs.dataobj), theirs.affine, task,
                     case=case, group=group, scheme=scheme)

