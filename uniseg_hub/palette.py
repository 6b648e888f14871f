"""What each label is, for people and viewers: one display colour per structure and its coded anatomy.

The 17 structures of the 11 tasks (``tasks.TASKS``) each have one colour, the same in every task, in the merged
all-tasks map, in the preview, in the colour tables and inside DICOM SEG and ``.seg.nrrd`` files: the colour of a
structure is ``PALETTE[v - 1]`` where ``v`` is its value in the official all-tasks map (liver 1 ... lesion 17).
Labels of tasks added to a model (``tasks.TaskTable.with_task``) are coloured the same way by their value in that
model's all-tasks map (``colour``: the 18th colour, then generated ones), so each keeps one colour in every file.
Labels of other models (a fine-tuned BTCV model, say) take the colours in label order.

``PALETTE`` was chosen once (by a greedy farthest-point search in CIELAB over saturated sRGB colours with lightness
between 45 and 88, so every colour stands out on a grey scan) and is kept as data: any two of its 18 colours differ
by a CIEDE2000 distance of at least 18, so no two are shades of one hue (the tests check this). Consecutive entries
are the most different, which keeps an organ and its tumour (1 and 2, 3 and 4...) far apart.

Codes: SNOMED CT concepts as the DICOM standard lists them (``pydicom.sr.codedict.codes.SCT``, the tests compare
each triplet with it). Where SNOMED has no concept for a label as the task defines it (the three BraTS tumour
sub-regions, the hepatic tumour of MSD, the "hepatic vessel" label that holds hepatic and portal veins), the
segment is coded with the nearest general concept (Neoplasm, Blood Vessel) and its anatomic region, and the
label's own name travels as the segment's name. Unknown labels (added tasks' too) are coded as generic Tissue,
named by the segment's name.

Also here: the colour tables 3D Slicer (``.ctbl``) and ITK-SNAP (label description file) read, written beside
every label map (by the bundle's ``pipeline.label_files.SaveColourTablesd``).
"""

from __future__ import annotations

import colorsys
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .files import write_text_atomic
from .tasks import TASKS, Task

PALETTE: tuple[tuple[int, int, int], ...] = (
    (225, 30, 30), (0, 255, 0), (0, 180, 255), (255, 180, 255), (255, 180, 0), (60, 120, 60),
    (105, 75, 255), (0, 240, 225), (240, 0, 150), (150, 105, 30), (150, 165, 0), (255, 165, 135),
    (150, 150, 255), (15, 180, 120), (0, 120, 210), (225, 105, 0), (195, 225, 150), (210, 90, 255),
)
"""18 distinct sRGB colours (0-255); see the module's docstring."""

GOLDEN_RATIO = 0.6180339887498949
"""Hue step of the colours beyond ``PALETTE``: consecutive values land far apart on the colour wheel."""


def colour(value: int) -> tuple[int, int, int]:
    """The colour of label value ``value`` (1-based): ``PALETTE[value - 1]``, beyond it saturated hues a golden
    ratio apart with alternating lightness, so a model with added tasks still has one colour per label."""
    if value <= len(PALETTE):
        return PALETTE[value - 1]
    hue = ((value - len(PALETTE)) * GOLDEN_RATIO) % 1.0
    return tuple(round(c * 255) for c in colorsys.hls_to_rgb(hue, (0.5, 0.65)[value % 2], 1.0))

Code = tuple[str, str, str]
"""(code value, coding scheme designator, code meaning), as DICOM writes a coded concept."""

ANATOMICAL_STRUCTURE: Code = ("91723000", "SCT", "Anatomical Structure")
ABNORMAL_STRUCTURE: Code = ("49755003", "SCT", "Morphologically Abnormal Structure")
TISSUE: Code = ("85756007", "SCT", "Tissue")
NEOPLASM: Code = ("108369006", "SCT", "Neoplasm")
LIVER: Code = ("10200004", "SCT", "Liver")
KIDNEY: Code = ("64033007", "SCT", "Kidney")
PANCREAS: Code = ("15776009", "SCT", "Pancreas")
SPLEEN: Code = ("78961009", "SCT", "Spleen")
COLON: Code = ("71854001", "SCT", "Colon")
LUNG: Code = ("39607008", "SCT", "Lung")
BRAIN: Code = ("12738006", "SCT", "Brain")
PROSTATE: Code = ("41216001", "SCT", "Prostate")
VERTEBRA: Code = ("51282000", "SCT", "Vertebra")
BLOOD_VESSEL: Code = ("59820001", "SCT", "Blood Vessel")
EDEMA: Code = ("79654002", "SCT", "Edema")
LESION: Code = ("52988006", "SCT", "Lesion")


@dataclass(frozen=True)
class Segment:
    """One label as a segment: its value in the label map, name, display colour and coded meaning."""

    value: int
    name: str
    colour: tuple[int, int, int]
    category: Code = TISSUE
    type: Code = TISSUE
    region: Code | None = None

    @property
    def colour_float(self) -> tuple[float, float, float]:
        """The colour with components in [0, 1]."""
        return tuple(c / 255.0 for c in self.colour)


_CODES: dict[str, tuple[Code, Code, Code | None]] = {
    "liver": (ANATOMICAL_STRUCTURE, LIVER, None),
    "liver tumour": (ABNORMAL_STRUCTURE, NEOPLASM, LIVER),
    "kidney": (ANATOMICAL_STRUCTURE, KIDNEY, None),
    "kidney tumour": (ABNORMAL_STRUCTURE, NEOPLASM, KIDNEY),
    "hepatic vessel": (ANATOMICAL_STRUCTURE, BLOOD_VESSEL, LIVER),
    "hepatic tumour": (ABNORMAL_STRUCTURE, NEOPLASM, LIVER),
    "pancreas": (ANATOMICAL_STRUCTURE, PANCREAS, None),
    "pancreas tumour": (ABNORMAL_STRUCTURE, NEOPLASM, PANCREAS),
    "colon tumour": (ABNORMAL_STRUCTURE, NEOPLASM, COLON),
    "lung tumour": (ABNORMAL_STRUCTURE, NEOPLASM, LUNG),
    "spleen": (ANATOMICAL_STRUCTURE, SPLEEN, None),
    "vertebra": (ANATOMICAL_STRUCTURE, VERTEBRA, None),
    "prostate": (ANATOMICAL_STRUCTURE, PROSTATE, None),
    "edema": (ABNORMAL_STRUCTURE, EDEMA, BRAIN),
    "non-enhancing tumour core": (ABNORMAL_STRUCTURE, NEOPLASM, BRAIN),
    "enhancing tumour": (ABNORMAL_STRUCTURE, NEOPLASM, BRAIN),
    "lesion": (ABNORMAL_STRUCTURE, LESION, None),
}
"""Category, type and anatomic region of each label name of ``tasks.TASKS``."""

STRUCTURES: dict[str, int] = {label: value for t in TASKS for value, label in zip(t.merged_labels, t.labels)}
"""Label name to its value in the all-tasks map: the index (1-based) of its colour in ``PALETTE``."""


def structure_name(name: str) -> str:
    """The structure a label name means: ``"liver: liver tumour"`` (the all-tasks map) is ``"liver tumour"``."""
    task, sep, label = name.partition(": ")
    return label if sep and label in STRUCTURES else name


def segment(value: int, name: str, merged: int | None = None) -> Segment:
    """The segment of label ``value`` named ``name``, whose value in its model's all-tasks map is ``merged`` (when
    known): an official structure (at its official value) gets its own colour and codes, any other label the colour
    of ``merged`` (else of ``value``) and the generic Tissue code."""
    structure = structure_name(name)
    if structure in STRUCTURES and merged in (None, STRUCTURES[structure]):
        category, kind, region = _CODES[structure]
        return Segment(value, name, PALETTE[STRUCTURES[structure] - 1], category, kind, region)
    return Segment(value, name, colour(merged or value))


def segments(label_names: Mapping[int, str], tasks: Sequence[Task] = ()) -> list[Segment]:
    """One segment per foreground label of ``label_names`` (value to name, 0 the background), in value order.

    ``tasks``: the task(s) whose label map this is (one task's own labels, or several tasks' merged map), so that
    each label takes the colour of its merged value (``segment``), the same in every file and run; without them
    colours go by name and value."""
    tasks = tuple(tasks)
    if len(tasks) == 1:
        merged = dict(enumerate(tasks[0].merged_labels, start=1))
    else:
        merged = {v: v for t in tasks for v in t.merged_labels}
    return [segment(int(v), str(n), merged.get(int(v))) for v, n in sorted(label_names.items()) if int(v) != 0]


def slicer_colour_table(label_names: Mapping[int, str], title: str = "uniseg-hub labels",
                        tasks: Sequence[Task] = ()) -> str:
    """A 3D Slicer colour table (``.ctbl``): ``value name R G B A`` per line, blanks in names as ``_``, background
    transparent; ``tasks`` as for ``segments``."""
    rows = [(0, "background", (0, 0, 0), 0)] + [(s.value, s.name, s.colour, 255)
                                                  for s in segments(label_names, tasks)]
    lines = [f"# Color table file {title}", f"# {len(rows)} values"]
    lines += [f"{v} {_token(name)} {r} {g} {b} {a}" for v, name, (r, g, b), a in rows]
    return "\n".join(lines) + "\n"


def itksnap_label_file(label_names: Mapping[int, str], tasks: Sequence[Task] = ()) -> str:
    """An ITK-SNAP label description file: index, R, G, B, opacity (0-1), visibility, mesh visibility, "name";
    ``tasks`` as for ``segments``."""
    lines = ["# ITK-SNAP Label Description File (written by uniseg-hub)",
             "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL",
             f"{0:5d} {0:5d} {0:4d} {0:4d} {0:8.2f} {0:2d} {0:2d}    \"Clear Label\""]
    for s in segments(label_names, tasks):
        r, g, b = s.colour
        lines.append(f"{s.value:5d} {r:5d} {g:4d} {b:4d} {1:8.2f} {1:2d} {1:2d}    \"{s.name.replace(chr(34), '')}\"")
    return "\n".join(lines) + "\n"


def _token(name: str) -> str:
    """A name as one whitespace-free token (the ``.ctbl`` format separates fields by blanks)."""
    return "_".join(name.split()) or "unnamed"


def colour_table_paths(label_map: str | os.PathLike) -> dict[str, str]:
    """The colour tables beside a label map: ``out/SCAN_liver.nii.gz`` gives ``out/SCAN_liver_colors.ctbl`` (3D
    Slicer) and ``out/SCAN_liver_itksnap_labels.txt`` (ITK-SNAP)."""
    base = os.fspath(label_map)
    for suffix in (".nii.gz", ".nii"):
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
            break
    return {"colour_table": f"{base}_colors.ctbl", "itksnap_labels": f"{base}_itksnap_labels.txt"}


def write_colour_tables(label_map: str | os.PathLike, label_names: Mapping[int, str],
                        tasks: Sequence[Task] = ()) -> dict[str, str]:
    """Write the colour tables of ``label_names`` (of ``tasks``' map, as for ``segments``) beside ``label_map``
    (atomically); their paths."""
    paths = colour_table_paths(label_map)
    write_text_atomic(paths["colour_table"], slicer_colour_table(label_names, os.path.basename(label_map), tasks))
    write_text_atomic(paths["itksnap_labels"], itksnap_label_file(label_names, tasks))
    return paths
