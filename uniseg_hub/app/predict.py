"""Segmentation for people: ``uniseg-hub predict`` (``demo`` runs it on the sample CT).

``predict`` runs the bundle's ``inference.json`` (MONAI's ``ConfigWorkflow`` with overrides; the one inference
pipeline) and takes what it needs from that run: the tasks, label names and output names the configuration
decided, and, from the evaluator's state, the label map as it was saved (values, affine, ``saved_to``) and the scan
as it was loaded. It then writes what a person looks at: a PNG preview and a table of label volumes. Each input
file is opened once and no output is read back.

Errors: a uniseg-hub error (or an ``OSError``) raised inside MONAI (a transform, a config expression) arrives
wrapped in MONAI's ``RuntimeError``s and is re-raised as itself (``unwrap_error``); anything else is a bug and
propagates unchanged.
"""

from __future__ import annotations

import errno
import logging
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..config import PredictOptions
from ..errors import InputError, UnisegHubError
from .bundle import bundle_dir
from .outputs import check_names, check_space, claim_outputs

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "uniseg-11task"
"""The manifest name of the official 11-task model."""


@dataclass
class Prediction:
    """Where the outputs of one prediction are, and the label volumes."""

    label_map: str
    task: str
    seconds: float
    probabilities: str | None = None
    preview: str | None = None
    volumes_json: str | None = None
    volumes_csv: str | None = None
    volumes: list[dict] = field(default_factory=list)
    colour_table: str | None = None  # 3D Slicer .ctbl beside the label map (pipeline.label_files)
    itksnap_labels: str | None = None  # ITK-SNAP label description file
    converted: str | None = None  # the --format file (.seg.nrrd or DICOM SEG), None for nifti

    def as_dict(self) -> dict:
        return asdict(self)


def unwrap_error(error: BaseException) -> BaseException | None:
    """The uniseg-hub error (or ``OSError``) that MONAI wrapped, else None.

    MONAI re-raises what a transform, a config expression or a component raises as a plain ``RuntimeError`` from
    the original (``apply_transform``, ``ConfigExpression.evaluate``, ``instantiate``), once per level. A chain of
    only such wrappers down to a ``UnisegHubError`` or an ``OSError`` is an error the user can act on; any other
    chain is a bug and stays as it is.
    """
    seen = error
    while type(seen) is RuntimeError and seen.__cause__ is not None:
        seen = seen.__cause__
    return seen if seen is not error and isinstance(seen, (UnisegHubError, OSError)) else None


def _messages(error: BaseException) -> list[str]:
    out = []
    while error is not None and len(out) < 50:
        out.append(str(error))
        error = error.__cause__ or error.__context__
    return out


def _typed(call, *args, **kwargs):
    """``call(*args, **kwargs)``, with an error MONAI wrapped raised as itself (``unwrap_error``)."""
    from ..pipeline.nifti_io import write_error

    write_error()
    try:
        return call(*args, **kwargs)
    except RuntimeError as e:
        root = unwrap_error(e)
        if root is None:
            root = write_error() if "suitable writer" in " ".join(_messages(e)) else None
        if root is None:
            raise
    raise root  # outside the handler: no context chain back to the wrapper (it holds the root as its cause)


def predict(
    inputs: Sequence[str] | str,
    task: str | int = "liver",
    out_dir: str = "uniseg-output",
    weights: str = DEFAULT_MODEL,
    device: str | None = None,
    tta: int | bool = 8,
    overlap: float = 0.5,
    probabilities: bool = False,
    preview: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    modality: str = "CT",
    sw_batch_size: int = 1,
    resampling: str = "nnunet",
    nan: str = "zero",
    normalization_mask: str = "training",
    window: str = "nnunet",
    format: str = "nifti",
    precision: str = "auto",
    fast: bool = False,
) -> Prediction:
    """Segment one scan (one file, or one file per channel, or a DICOM series folder) for a task or ``"all"``.

    Writes ``<case>_<task>.nii.gz`` (uint8 labels, the input's grid), optionally ``<case>_<task>_probabilities
    .nii.gz``, ``<case>_<task>_preview.png`` and ``<case>_<task>_volumes.{json,csv}`` into ``out_dir``, where
    ``<case>`` is the first input's name without its image suffix (``pipeline.cases.CaseLayout``). Existing outputs
    are an error unless ``overwrite``; every file is written atomically. The options are checked first
    (``config.PredictOptions``, ``ConfigError`` naming the option); ``resampling``, ``nan``,
    ``normalization_mask`` and ``window`` default to the official pipeline's behaviour. The outputs are claimed
    (``outputs.claim_outputs``: another run on them is an ``InputError`` at once, a killed run's incomplete set is
    replaced) and checked (names, free space, folder, device) before the model loads; a failure removes what was
    written. Beside the label map go its colour tables (``_colors.ctbl``, ``_itksnap_labels.txt``) and, with
    ``format``, a ``.seg.nrrd`` or a DICOM SEG (``_seg.dcm``, DICOM series input only), written by the bundle
    (``pipeline.label_files``).

    Speed (issue 17): ``tta`` is the number of test-time flips, 8 (official), 4, 2 or 1 (``True``/``False`` = 8/1);
    ``precision`` is ``auto`` (official: float16 autocast on CUDA, float32 on CPU), ``fp32``, ``bf16`` or ``fp16``;
    ``fast`` takes ``config.FAST_PRESET`` for ``tta`` and ``overlap`` left at their defaults.
    """
    options = PredictOptions(task=task, out_dir=out_dir, weights=weights, device=device, tta=tta, overlap=overlap,
                             probabilities=probabilities, preview=preview, overwrite=overwrite, progress=progress,
                             modality=modality, sw_batch_size=sw_batch_size, resampling=resampling, nan=nan,
                             normalization_mask=normalization_mask, window=window, format=format,
                             precision=precision, fast=fast)
    inputs = [os.fspath(inputs)] if isinstance(inputs, (str, os.PathLike)) else [os.fspath(p) for p in inputs]
    if not inputs:
        raise InputError("no input given; pass a NIfTI file, one file per channel, or a DICOM series folder")
    for path in inputs:  # what can be checked in a moment is checked before MONAI and the model load
        if not os.path.exists(path):
            raise InputError(f"input {path} does not exist")
    if options.format == "dicom-seg":  # output formats (pipeline.label_files): checked before the model loads
        from ..pipeline.label_files import check_format_inputs

        check_format_inputs(options.format, inputs)
    check_run(options)
    start = time.perf_counter()
    workflow = _typed(bundle_workflow, bundle_overrides(options, inputs))
    parsed = lambda name: _typed(workflow.parser.get_parsed_content, name)  # noqa: E731
    postfix, names, layout = parsed("output_postfix"), parsed("label_names"), parsed("label_layout")
    planned = {"label_map": layout.filename(subject=inputs[0])}  # the name SaveImaged will give (same layout)
    if options.probabilities:
        planned["probabilities"] = parsed("probabilities_layout").filename(subject=inputs[0])
    planned.update(companions(layout, planned["label_map"], options.preview, options.format))
    check_names(planned)
    with claim_outputs(planned) as claim:
        existing = [p for p in planned.values() if os.path.exists(p)]
        if existing and not options.overwrite:
            if claim.interrupted is None:
                raise InputError(f"{existing[0]} already exists; choose another --out folder or pass --overwrite")
            logger.warning("replacing %s, left incomplete by a run that was killed (process %s)", ", ".join(
                Path(p).name for p in existing), claim.interrupted.get("pid", "?"))
            workflow.parser["overwrite"] = True
        check_space(options.out_dir, _output_bytes(inputs[0], options, len(names)))
        return _segment(workflow, options, layout, names, postfix, start, inputs)


def _segment(workflow, options: PredictOptions, layout, names, postfix: str, start: float,
             inputs: Sequence[str]) -> Prediction:
    """Run the claimed prediction: the bundle's workflow, then the preview and the volume tables (the last steps
    of the writing bar, ``pipeline.progress``)."""
    bars = _typed(workflow.parser.get_parsed_content, "stage_progress")
    try:
        cases = run_workflow(workflow)
        if len(cases) != 1:
            raise RuntimeError(f"the bundle segmented {len(cases)} cases for one input")
        model, tasks = (_typed(workflow.parser.get_parsed_content, name) for name in ("network", "tasks"))
        result = write_companions(cases[0], options, layout, names, postfix, model, tasks, inputs[0], bars)
    finally:
        bars.end()  # a failure leaves no bar open above its error line
    result.seconds = round(time.perf_counter() - start, 2)
    return result


def write_companions(case: dict, options: PredictOptions, layout, names, postfix: str, model, tasks,
                     source: str, progress=None) -> Prediction:
    """The preview and the volume tables of one segmented case (``case_outputs``), beside its label map; ``model``,
    ``tasks`` (the run's: their first one's channels choose the window, all of them the colours) and the ``source``
    input name the preview's title, window and colours. ``progress``: the run's ``pipeline.progress.StageBars``,
    told of each file written (``companion_writes``)."""
    from .report import label_volumes, render_preview, write_volume_tables

    result = Prediction(label_map=case["label_map"], task=postfix, seconds=0.0,
                        probabilities=case.get("probabilities"))
    files = companions(layout, result.label_map, options.preview, options.format)
    result.volumes = label_volumes(case["labels"], case["affine"], names)
    write_volume_tables(result.volumes, Path(files["volumes_json"]), Path(files["volumes_csv"]))
    result.volumes_json, result.volumes_csv = files["volumes_json"], files["volumes_csv"]
    if progress is not None:
        progress.step("volume tables")
    # output formats (written by the bundle: pipeline.label_files) and the titled, windowed preview
    from .report import preview_title

    result.colour_table, result.itksnap_labels = files["colour_table"], files["itksnap_labels"]
    result.converted = case.get("converted")
    if options.preview:
        render_preview(case["source"], case["labels"], case["affine"], names, Path(files["preview"]),
                       title=preview_title(source, postfix, model, options.weights),
                       window="ct" if tasks[0].channels[0] == "CT" else "percentile", tasks=tasks)
        result.preview = files["preview"]
        if progress is not None:
            progress.step("preview")
    return result


def companion_writes(options: PredictOptions) -> int:
    """The writing steps of ``write_companions``: the volume tables, and the preview if there is one."""
    return 1 + int(bool(options.preview))


def companions(layout, label_map: str, preview: bool = True, fmt: str = "nifti") -> dict[str, str]:
    """The files predict writes beside the label map, named after it (``CaseLayout.companion``; the colour tables
    and the ``fmt`` file: ``pipeline.label_files.output_paths``)."""
    from ..pipeline.label_files import output_paths

    names = {"preview": "preview.png"} if preview else {}
    names.update(volumes_json="volumes.json", volumes_csv="volumes.csv")
    return {**{key: layout.companion(label_map, name) for key, name in names.items()},
            **output_paths(label_map, fmt)}


def bundle_overrides(options: PredictOptions, inputs: Sequence[str]) -> dict:
    """The ``inference.json`` overrides for ``options`` and the input files (one, or one per channel)."""
    overrides = {"input": inputs[0] if len(inputs) == 1 else list(inputs), "task": options.task,
                 "modality": options.modality, "output_dir": options.out_dir, "weights": options.weights,
                 "tta": options.tta, "overlap": options.overlap, "overwrite": options.overwrite,
                 "progress": options.progress, "save_probabilities": options.probabilities,
                 "keep_source": options.preview, "sw_batch_size": options.sw_batch_size,
                 "resampling": options.resampling, "nan": options.nan,
                 "normalization_mask": options.normalization_mask, "window": options.window}
    overrides["format"] = options.format
    overrides["stage_progress#writes"] = 1 + companion_writes(options)  # the bundle's postprocessing, then ours
    overrides["precision"] = options.precision  # speed options (issue 17); options.tta is a level, --fast applied
    if options.device is not None:
        overrides["device"] = f"$torch.device({options.device!r})"
    return overrides


def _output_bytes(first_input: str, options: PredictOptions, labels: int) -> int:
    """An upper bound of what the outputs take on disk (uncompressed label map, probabilities as float32, preview
    and tables); 0 for a DICOM folder (its size is known only once read)."""
    if os.path.isdir(first_input):
        return 0
    from ..pipeline.cases import describe_file

    shape, _ = describe_file(first_input)
    voxels = int(np.prod(shape[:3]))
    return voxels + (voxels * 4 * max(labels, 2) if options.probabilities else 0) + (4 << 20)


def check_run(options: PredictOptions) -> None:
    """What a run (one case or a cohort) needs before the model loads: the device, the precision on it, a writable
    output folder; ``InputError`` or ``OSError`` naming the fix."""
    _check_device(options.device)
    _check_precision(options)
    _check_writable(options.out_dir)


def _check_device(device: str | None) -> None:
    """A CUDA device that PyTorch cannot use is an error now, in one line, not deep inside the model's loading."""
    if device is None or not str(device).startswith("cuda"):
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = torch.device(device).index or 0
    if index >= count:
        have = f"{count} CUDA device(s)" if count else f"no CUDA device (torch {torch.__version__})"
        raise InputError(f"--device {device}: PyTorch sees {have}; use --device cpu, or leave --device out to use "
                         "a GPU when there is one")


def _check_precision(options: PredictOptions) -> None:
    """Speed options (issue 17): a precision the device cannot run is an error now (``fp16`` on CPU), and bf16 on a
    CPU without native bfloat16 a warning, before the model loads (``pipeline.predictor.autocast_dtype``)."""
    if options.precision in ("auto", "fp32"):
        return
    import torch

    from ..pipeline.predictor import autocast_dtype

    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    autocast_dtype(options.precision, torch.device(device).type)


def _check_writable(folder: str) -> None:
    """An output folder that cannot be written is an ``OSError`` now, not after the segmentation (MONAI's
    ``SaveImage`` reports a failed write as a ``RuntimeError`` without the cause)."""
    existing = Path(folder).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "the output folder is a file; choose another --out folder",
                                 str(existing))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "cannot write to the output folder (permission denied); choose another "
                              "--out folder", str(existing))


def quiet() -> None:
    """Silence MONAI's and ignite's loggers (they have their own handlers and levels, and log failures that we
    report ourselves in one line): people read our output."""
    for name in ["monai", "ignite", *logging.root.manager.loggerDict]:
        if name.split(".")[0] in ("monai", "ignite"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def bundle_workflow(overrides: dict):
    """The bundle's ``configs/inference.json`` with ``overrides``, initialized (nothing is built or run yet)."""
    from monai.bundle import ConfigWorkflow

    root = bundle_dir()
    quiet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        workflow = ConfigWorkflow(config_file=str(root / "configs" / "inference.json"),
                                  meta_file=str(root / "configs" / "metadata.json"), logging_file=False,
                                  workflow_type="infer", bundle_root=str(root), **overrides)
        workflow.initialize()
    return workflow


class CaseOutputs:
    """Ignite handler for the bundle's evaluator: after each iteration, what the postprocessing left of each case
    (decollated items: batch and output), as ``case_outputs`` takes it."""

    def __init__(self):
        self.cases: list[dict] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        items = zip(batch, output) if isinstance(output, list) else [(batch, output)]
        self.cases.extend(case_outputs({**b, **o}) for b, o in items)


def case_outputs(item: dict) -> dict:
    """One case of the run: ``label_map`` (where it was saved), ``labels`` ((x, y, z) uint8, as saved), ``affine``
    (its voxel-to-world matrix), ``probabilities`` (where they were saved, if they were) and ``source`` (the scan
    as loaded, channel-first, if ``keep_source``)."""
    pred = item["pred"]
    out = {"label_map": str(pred.meta["saved_to"]),
           "labels": np.asarray(pred.detach().cpu()[0]).astype(np.uint8),  # SaveImaged's output_dtype
           "affine": np.asarray(pred.affine.detach().cpu(), dtype=np.float64)}
    if "probabilities" in item:
        out["probabilities"] = str(item["probabilities"].meta["saved_to"])
    if "converted_to" in pred.meta:  # pipeline.label_files.SaveLabelFormatd
        out["converted"] = str(pred.meta["converted_to"])
    if "source" in item:
        out["source"] = np.asarray(item["source"].detach().cpu())
    return out


def run_workflow(workflow) -> list[dict]:
    """Run an initialized ``inference.json`` workflow; the outputs of each case (``case_outputs``)."""
    collect = CaseOutputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        collect.attach(_typed(lambda: workflow.evaluator))
        quiet()  # the engines made their loggers just now
        _typed(workflow.run)
        _typed(workflow.finalize)
    return collect.cases

