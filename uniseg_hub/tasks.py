"""The 11 upstream tasks of UniSeg as data: the single source of task facts for the network, bundle and CLI.

Facts come from the official code (github yeerwen/UniSeg, commit e3ae40d; see ``shared/reference/uniseg-official.md``
§1.4, §2, §3.1 and §4):

* ids and class counts: ``UniSeg_Trainer.py`` (``task_class``), label names from the dataset converters;
* training spacing: the planners in ``UniSeg_Planner3D.py``, given here in MONAI axis order (x, y, z), i.e. the
  official (z, y, x) spacing reversed;
* normalisation: ``DoDNetPreprocessor.py``: CT is clipped to [-325, 325] and scaled to [0, 1]; every other channel
  gets a per-image z-score. For BraTS the z-score uses the non-zero (brain) mask only (nnU-Net's rule; inferred);
* merged label map of the official all-tasks mode (``predict.py`` with ``-task_id -1``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UnknownTaskError

CT_WINDOW = (-325.0, 325.0)
"""HU window of the official CT normalisation: clip to it, then scale linearly to [0, 1]."""

ZSCORE_EPS = 1e-8
"""The official z-score divides by ``std + 1e-8``."""

GROUPS = ("CT", "MR", "PET-CT")
"""Modality groups of the all-tasks mode: every task of a group runs on the same input."""


@dataclass(frozen=True)
class Task:
    """One upstream task.

    Attributes:
        id: the official task id, the index of the task's prompt (0-10).
        name: short name used on the command line and in configs (``"liver"``).
        title: human-readable description.
        dataset: the source dataset.
        group: modality group, one of ``GROUPS``.
        channels: the input channels in order, e.g. ``("T1", "T1ce", "T2", "FLAIR")`` for BraTS.
        normalization: one scheme per channel: ``"ct_window"`` or ``"zscore"``.
        labels: foreground label names; label ``i`` (1-based) is ``labels[i - 1]``, 0 is background.
        spacing: training voxel spacing in mm, MONAI axis order (x, y, z).
        merged_labels: the value of each foreground label in the official all-tasks label map.
        nonzero_mask: z-score over the non-zero voxels only, zero outside (BraTS).
    """

    id: int
    name: str
    title: str
    dataset: str
    group: str
    channels: tuple[str, ...]
    normalization: tuple[str, ...]
    labels: tuple[str, ...]
    spacing: tuple[float, float, float]
    merged_labels: tuple[int, ...]
    nonzero_mask: bool = False

    @property
    def num_channels(self) -> int:
        """Number of input channels (1, 2 or 4)."""
        return len(self.channels)

    @property
    def num_classes(self) -> int:
        """C_t: classes including background; the task uses the first C_t channels of the shared head."""
        return len(self.labels) + 1

    @property
    def label_names(self) -> dict[int, str]:
        """Label value to name, background included."""
        return {0: "background", **{i + 1: n for i, n in enumerate(self.labels)}}


def _ct(task_id, name, title, dataset, labels, spacing, merged):
    return Task(task_id, name, title, dataset, "CT", ("CT",), ("ct_window",), labels, spacing, merged)


MOTS_SPACING = (1.5, 1.5, 3.0)

TASKS: tuple[Task, ...] = (
    _ct(0, "liver", "liver and liver tumour", "LiTS (MOTS)", ("liver", "liver tumour"), MOTS_SPACING, (1, 2)),
    _ct(1, "kidney", "kidney and kidney tumour", "KiTS19 (MOTS)", ("kidney", "kidney tumour"), MOTS_SPACING, (3, 4)),
    _ct(2, "hepatic_vessel", "hepatic vessel and tumour", "MSD Hepatic Vessel (MOTS)",
        ("hepatic vessel", "hepatic tumour"), MOTS_SPACING, (5, 6)),
    _ct(3, "pancreas", "pancreas and pancreas tumour", "MSD Pancreas (MOTS)", ("pancreas", "pancreas tumour"),
        MOTS_SPACING, (7, 8)),
    _ct(4, "colon", "colon tumour", "MSD Colon (MOTS)", ("colon tumour",), MOTS_SPACING, (9,)),
    _ct(5, "lung", "lung tumour", "MSD Lung (MOTS)", ("lung tumour",), MOTS_SPACING, (10,)),
    _ct(6, "spleen", "spleen", "MSD Spleen (MOTS)", ("spleen",), MOTS_SPACING, (11,)),
    _ct(7, "vertebrae", "vertebrae (all vertebrae as one label)", "VerSe20", ("vertebra",), (2.0, 2.0, 4.0), (12,)),
    Task(8, "prostate", "prostate (T2 MR)", "multi-site prostate (BIDMC, BMC, HK, I2CVB, RUNMC, UCL)", "MR",
         ("T2",), ("zscore",), ("prostate",), (1.5, 1.5, 3.0), (13,)),
    Task(9, "brats", "brain tumour (four MR sequences)", "BraTS 2021", "MR", ("T1", "T1ce", "T2", "FLAIR"),
         ("zscore",) * 4, ("edema", "non-enhancing tumour core", "enhancing tumour"), (1.0, 1.0, 1.0),
         (14, 15, 16), nonzero_mask=True),
    Task(10, "autopet", "whole-body FDG-avid lesions (PET-CT)", "AutoPET 2022", "PET-CT", ("CT", "PET"),
         ("ct_window", "zscore"), ("lesion",), (4.0, 4.0, 8.0), (17,)),
)

HEAD_CHANNELS = max(t.num_classes for t in TASKS)
"""Width of the shared segmentation head of the official model (4)."""

_ALIASES = {"hepatic": "hepatic_vessel", "verse": "vertebrae", "vertebra": "vertebrae", "brain": "brats",
            "pet": "autopet", "petct": "autopet"}


def task_names() -> list[str]:
    """The task names in id order."""
    return [t.name for t in TASKS]


def get_task(task: int | str | Task) -> Task:
    """Look a task up by id (``0``, ``"0"``), name (``"liver"``) or alias; case, ``-`` and spaces do not matter."""
    if isinstance(task, Task):
        return task
    if isinstance(task, bool):
        raise UnknownTaskError(f"task {task!r} is not a task; use one of: {', '.join(task_names())} (or ids 0-10)")
    key = str(task).strip().lower().replace("-", "_").replace(" ", "_")
    if key.lstrip("-").isdigit():
        index = int(key)
        if 0 <= index < len(TASKS):
            return TASKS[index]
    else:
        key = _ALIASES.get(key, key)
        for t in TASKS:
            if t.name == key:
                return t
    raise UnknownTaskError(
        f"unknown task {task!r}; the tasks are: "
        + ", ".join(f"{t.name} ({t.id})" for t in TASKS)
    )


def tasks_in_group(group: str) -> tuple[Task, ...]:
    """The tasks of a modality group, in id order (the all-tasks mode runs them in this order)."""
    wanted = group.upper().replace("_", "-")
    if wanted == "PETCT":
        wanted = "PET-CT"
    if wanted not in GROUPS:
        raise UnknownTaskError(f"unknown modality group {group!r}; the groups are: {', '.join(GROUPS)}")
    return tuple(t for t in TASKS if t.group == wanted)


def merged_label_names(group: str | None = None) -> dict[int, str]:
    """Label value to ``"task: label"`` name in the official all-tasks map (optionally one group only).

    Later tasks overwrite earlier ones where they overlap, as in the official code.
    """
    chosen = TASKS if group is None else tasks_in_group(group)
    names = {0: "background"}
    for t in chosen:
        for value, label in zip(t.merged_labels, t.labels):
            names[value] = f"{t.name}: {label}"
    return names
