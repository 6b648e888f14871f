"""The 11 upstream tasks of UniSeg as data: the single source of task facts for the network, bundle and CLI.

Facts come from the official code (github yeerwen/UniSeg, commit e3ae40d; see ``shared/reference/uniseg-official.md``
§1.4, §2, §3.1 and §4):

* ids and class counts: ``UniSeg_Trainer.py`` (``task_class``), label names from the dataset converters;
* training spacing: the planners in ``UniSeg_Planner3D.py``, given here in MONAI axis order (x, y, z), i.e. the
  official (z, y, x) spacing reversed;
* normalisation: ``DoDNetPreprocessor.py``: CT is clipped to [-325, 325] and scaled to [0, 1]; every other channel
  gets a per-image z-score. For BraTS the z-score uses the non-zero (brain) mask only (nnU-Net's rule; inferred);
* merged label map of the official all-tasks mode (``predict.py`` with ``-task_id -1``).

A model's tasks are a ``TaskTable``: ``OFFICIAL_TASKS`` (these eleven) unless its ``config.json`` lists its own
(tasks added by ``uniseg-hub add-task`` follow the eleven); ``get_task`` and the other module functions look up the
official table.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError, UnknownTaskError

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

NORMALIZATIONS = ("ct_window", "zscore")
MAX_LABELS = 255
"""The largest label value, per task and in the all-tasks map: label maps are written as uint8."""
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_")


def _key(task) -> str:
    return str(task).strip().lower().replace("-", "_").replace(" ", "_")


def _text(value, name: str, limit: int = 200) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > limit or not value.isprintable():
        raise ConfigError(f"{name} must be a non-empty printable text of at most {limit} characters, "
                          f"got {str(value)[:80]!r}")
    return value


def _texts(value, name: str, low: int, high: int) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not low <= len(value) <= high:
        raise ConfigError(f"{name} must be a list of {low} to {high} names, got {str(value)[:80]!r}")
    return tuple(_text(v, f"{name}[{i}]", 80) for i, v in enumerate(value))


def task_from_dict(data, where: str = "task") -> Task:
    """A ``Task`` from its JSON form (``task_to_dict``), every field checked, ``ConfigError`` naming the field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be an object with the task's fields, got {str(data)[:80]!r}")
    known = {f for f in Task.__dataclass_fields__}
    missing = known - {"nonzero_mask"} - set(data)
    unknown = set(data) - known
    if missing or unknown:
        raise ConfigError(f"{where} must have the fields {', '.join(sorted(known))}; missing: "
                          f"{', '.join(sorted(missing)) or 'none'}, unknown: {', '.join(sorted(unknown)) or 'none'}")
    task_id = data["id"]
    if isinstance(task_id, bool) or not isinstance(task_id, int) or not 0 <= task_id < 1024:
        raise ConfigError(f"{where}.id must be a whole number from 0 to 1023, got {task_id!r}")
    name = _text(data["name"], f"{where}.name", 40)
    if set(name) - _NAME_CHARS or name[0].isdigit() or name == "all":
        raise ConfigError(f"{where}.name must be lower-case letters, digits and _ (not starting with a digit, not "
                          f"'all'), e.g. 'knee_cartilage'; got {name!r}")
    group = data["group"]
    if group not in GROUPS:
        raise ConfigError(f"{where}.group must be one of {', '.join(GROUPS)}, got {str(group)[:40]!r}")
    channels = _texts(data["channels"], f"{where}.channels", 1, 8)
    normalization = _texts(data["normalization"], f"{where}.normalization", len(channels), len(channels))
    if set(normalization) - set(NORMALIZATIONS):
        raise ConfigError(f"{where}.normalization takes {' or '.join(NORMALIZATIONS)} per channel, got "
                          f"{list(normalization)}")
    labels = _texts(data["labels"], f"{where}.labels", 1, MAX_LABELS)
    spacing = data["spacing"]
    if (not isinstance(spacing, (list, tuple)) or len(spacing) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 100 for v in spacing)):
        raise ConfigError(f"{where}.spacing must be three voxel sizes in mm (x, y, z), each above 0 and below 100, "
                          f"got {str(spacing)[:80]!r}")
    merged = data["merged_labels"]
    if (not isinstance(merged, (list, tuple)) or len(merged) != len(labels)
            or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_LABELS for v in merged)):
        raise ConfigError(f"{where}.merged_labels must hold one whole number from 1 to {MAX_LABELS} per label "
                          f"({len(labels)}), got {str(merged)[:80]!r}")
    nonzero = data.get("nonzero_mask", False)
    if not isinstance(nonzero, bool):
        raise ConfigError(f"{where}.nonzero_mask must be true or false, got {nonzero!r}")
    return Task(task_id, name, _text(data["title"], f"{where}.title"), _text(data["dataset"], f"{where}.dataset"),
                group, channels, normalization, labels, tuple(float(v) for v in spacing), tuple(merged), nonzero)


def task_to_dict(task: Task) -> dict:
    """The JSON form of a task (``config.json``'s ``tasks`` list)."""
    return {"id": task.id, "name": task.name, "title": task.title, "dataset": task.dataset, "group": task.group,
            "channels": list(task.channels), "normalization": list(task.normalization), "labels": list(task.labels),
            "spacing": list(task.spacing), "merged_labels": list(task.merged_labels),
            "nonzero_mask": task.nonzero_mask}


def modality_group(name: str) -> str | None:
    """``name`` as one of ``GROUPS`` (any case, ``_`` for ``-``, ``PETCT`` for ``PET-CT``), or None if it is none."""
    wanted = str(name).strip().upper().replace("_", "-")
    wanted = "PET-CT" if wanted == "PETCT" else wanted
    return wanted if wanted in GROUPS else None


def _merged_names(tasks) -> dict[int, str]:
    names = {0: "background"}
    for t in tasks:
        for value, label in zip(t.merged_labels, t.labels):
            names[value] = f"{t.name}: {label}"
    return names


def label_names(tasks) -> dict[int, str]:
    """The names of the label map that ``tasks`` (of one run) write: one task's own labels, or for several the
    merged all-tasks map's ``"task: label"`` names of these tasks only."""
    tasks = tuple(tasks)
    return tasks[0].label_names if len(tasks) == 1 else _merged_names(tasks)


@dataclass(frozen=True)
class TaskTable:
    """The tasks of one model, in prompt order: the official eleven (``OFFICIAL_TASKS``) or those a model's
    ``config.json`` lists (tasks added by ``add-task`` follow the eleven).

    Ids are the positions (0, 1, ...), names are unique, merged label values are unique across tasks.
    """

    tasks: tuple[Task, ...]

    def __post_init__(self):
        tasks = tuple(self.tasks)
        if not tasks:
            raise ConfigError("a model needs at least one task")
        for i, t in enumerate(tasks):
            if t.id != i:
                raise ConfigError(f"task {t.name!r} has id {t.id} at position {i}: ids must be 0, 1, 2, ... in order")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ConfigError(f"task names must be unique, got {names}")
        merged = [v for t in tasks for v in t.merged_labels]
        if len(set(merged)) != len(merged):
            raise ConfigError("merged label values must be unique across tasks, got "
                              + ", ".join(f"{t.name}: {list(t.merged_labels)}" for t in tasks))
        object.__setattr__(self, "tasks", tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self):
        return iter(self.tasks)

    def __getitem__(self, index: int) -> Task:
        return self.tasks[index]

    @property
    def official(self) -> bool:
        """Whether these are exactly the eleven official tasks."""
        return self.tasks == TASKS

    def names(self) -> list[str]:
        """The task names in id order."""
        return [t.name for t in self.tasks]

    def describe(self) -> str:
        return ", ".join(f"{t.name} ({t.id})" for t in self.tasks)

    def get(self, task: int | str | Task) -> Task:
        """Look a task up by id (``0``, ``"0"``), name (``"liver"``) or alias; case, ``-`` and spaces do not matter."""
        if isinstance(task, Task):
            if task in self.tasks:
                return task
            raise UnknownTaskError(f"task {task.name!r} is not one of this model's tasks: {self.describe()}")
        if isinstance(task, bool):
            raise UnknownTaskError(f"task {task!r} is not a task; use one of: {self.describe()}")
        key = _key(task)
        if key.lstrip("-").isdigit():
            index = int(key)
            if 0 <= index < len(self.tasks):
                return self.tasks[index]
        else:
            for name in (key, _ALIASES.get(key) if self.official else None):
                for t in self.tasks:
                    if t.name == name:
                        return t
        raise UnknownTaskError(f"unknown task {task!r}; the tasks are: {self.describe()}")

    def in_group(self, group: str) -> tuple[Task, ...]:
        """The tasks of a modality group, in id order (the all-tasks mode runs them in this order)."""
        wanted = modality_group(group)
        if wanted is None:
            raise UnknownTaskError(f"unknown modality group {group!r}; the groups are: {', '.join(GROUPS)}")
        return tuple(t for t in self.tasks if t.group == wanted)

    def merged_label_names(self, group: str | None = None) -> dict[int, str]:
        """Label value to ``"task: label"`` name in the all-tasks map (optionally one group only)."""
        return _merged_names(self.tasks if group is None else self.in_group(group))

    @property
    def merged_classes(self) -> int:
        """Channels of a one-hot all-tasks map: background plus the largest merged label value."""
        return 1 + max(v for t in self.tasks for v in t.merged_labels)

    def to_json(self) -> list[dict]:
        """The table as ``config.json`` stores it."""
        return [task_to_dict(t) for t in self.tasks]

    @classmethod
    def from_json(cls, data, where: str = "tasks") -> TaskTable:
        """A table from its JSON form, every task checked (``ConfigError`` naming the field)."""
        if not isinstance(data, list) or not 1 <= len(data) <= 1024:
            raise ConfigError(f"{where} must be a list of 1 to 1024 tasks, got {str(data)[:80]!r}")
        return cls(tuple(task_from_dict(d, f"{where}[{i}]") for i, d in enumerate(data)))

    def with_task(self, name: str, *, labels, channels, normalization, spacing, group: str = "CT",
                  title: str | None = None, dataset: str = "user dataset", nonzero_mask: bool = False) -> TaskTable:
        """This table and one more task after the last (the next id; merged label values after the largest)."""
        first = self.merged_classes
        if first + len(labels) - 1 > MAX_LABELS:
            raise ConfigError(f"the all-tasks label map has values up to {first - 1}; {len(labels)} more labels would "
                              f"pass {MAX_LABELS}, the largest value of the uint8 label maps; add a task with fewer "
                              "labels, or grow the model from one with fewer tasks")
        task = task_from_dict({
            "id": len(self.tasks), "name": name, "title": title or name.replace("_", " "), "dataset": dataset,
            "group": group, "channels": list(channels), "normalization": list(normalization),
            "labels": list(labels), "spacing": list(spacing),
            "merged_labels": list(range(first, first + len(labels))), "nonzero_mask": nonzero_mask,
        }, f"task {name!r}")
        if task.name in self.names() or _ALIASES.get(task.name) in self.names():
            raise ConfigError(f"the model already has a task named {task.name!r}; choose another name")
        return TaskTable((*self.tasks, task))


OFFICIAL_TASKS = TaskTable(TASKS)
"""The eleven official tasks: the table of every model whose configuration lists none."""


def task_names() -> list[str]:
    """The official task names in id order."""
    return OFFICIAL_TASKS.names()


def get_task(task: int | str | Task) -> Task:
    """Look an official task up by id (``0``, ``"0"``), name (``"liver"``) or alias (``TaskTable.get``)."""
    return OFFICIAL_TASKS.get(task)


def tasks_in_group(group: str) -> tuple[Task, ...]:
    """The official tasks of a modality group, in id order."""
    return OFFICIAL_TASKS.in_group(group)


def merged_label_names(group: str | None = None) -> dict[int, str]:
    """Label value to ``"task: label"`` name in the official all-tasks map (optionally one group only).

    Later tasks overwrite earlier ones where they overlap, as in the official code.
    """
    return OFFICIAL_TASKS.merged_label_names(group)
