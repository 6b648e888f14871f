"""Segmentation for people: ``uniseg-hub predict`` and ``uniseg-hub demo``.

``predict`` runs the bundle's ``inference.json`` (MONAI's ``ConfigWorkflow`` with overrides; the one inference
pipeline) and then writes what a person looks at: a PNG preview and a table of label volumes, computed from the
written label map. Errors come back as one ``UnisegHubError`` whatever layer raised them.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch

from .errors import UnisegHubError
from .inference import InputError, as_bool, count_channels, resolve_tasks
from .tasks import merged_label_names

DEFAULT_MODEL = "uniseg-11task"
"""The manifest name of the official 11-task model."""


def bundle_dir() -> Path:
    """The bundle folder: shipped inside the installed package, or ``bundle/`` of a source checkout."""
    candidates = [Path(str(resources.files("uniseg_hub") / "bundle")), Path(__file__).resolve().parents[1] / "bundle"]
    for candidate in candidates:
        if (candidate / "configs" / "inference.json").is_file():
            return candidate
    raise UnisegHubError("the bundle's configs are missing from this installation; reinstall uniseg-hub")


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

    def as_dict(self) -> dict:
        return asdict(self)


def user_error(error: BaseException) -> UnisegHubError:
    """The first uniseg-hub error in an exception chain (MONAI wraps transform errors), else a wrapped summary."""
    seen = error
    while seen is not None:
        if isinstance(seen, UnisegHubError):
            return seen
        seen = seen.__cause__ or seen.__context__
    deepest = error
    while (deepest.__cause__ or deepest.__context__) is not None:
        deepest = deepest.__cause__ or deepest.__context__
    message = str(deepest).strip().splitlines()[0] if str(deepest).strip() else type(deepest).__name__
    return UnisegHubError(f"segmentation failed: {type(deepest).__name__}: {message}")


def _case_name(path: str) -> str:
    name = Path(path.rstrip("/")).name
    for suffix in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def predict(
    inputs: Sequence[str] | str,
    task: str | int = "liver",
    out_dir: str = "uniseg-output",
    weights: str = DEFAULT_MODEL,
    device: str | None = None,
    tta: bool = True,
    overlap: float = 0.5,
    probabilities: bool = False,
    preview: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    modality: str = "CT",
    sw_batch_size: int = 1,
) -> Prediction:
    """Segment one scan (one file, or one file per channel, or a DICOM series folder) for a task or ``"all"``.

    Writes ``<case>_<task>.nii.gz`` (uint8 labels, the input's grid), optionally ``<case>_<task>_probabilities
    .nii.gz``, ``<case>_<task>_preview.png`` and ``<case>_<task>_volumes.{json,csv}`` into ``out_dir``. Existing
    outputs are an error unless ``overwrite``; every file is written atomically.
    """
    inputs = [str(Path(inputs))] if isinstance(inputs, (str, Path)) else [str(Path(p)) for p in inputs]
    if not inputs:
        raise InputError("no input given; pass a NIfTI file, one file per channel, or a DICOM series folder")
    image = inputs[0] if len(inputs) == 1 else inputs
    tasks = resolve_tasks(task, modality, count_channels([{"image": image}]))
    postfix = "all" if len(tasks) > 1 else tasks[0].name
    names = merged_label_names(tasks[0].group) if len(tasks) > 1 else tasks[0].label_names
    out = Path(out_dir)
    stem = out / f"{_case_name(inputs[0])}_{postfix}"
    planned = {"label_map": Path(f"{stem}.nii.gz")}
    if as_bool(probabilities):
        planned["probabilities"] = Path(f"{stem}_probabilities.nii.gz")
    if as_bool(preview):
        planned["preview"] = Path(f"{stem}_preview.png")
    planned["volumes_json"], planned["volumes_csv"] = Path(f"{stem}_volumes.json"), Path(f"{stem}_volumes.csv")
    existing = [str(p) for p in planned.values() if p.exists()]
    if existing and not as_bool(overwrite):
        raise InputError(f"{existing[0]} already exists; choose another --out folder or pass --overwrite")
    if device is not None:
        try:
            torch.device(str(device))
        except RuntimeError as e:
            raise InputError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from e
    overrides = {"input": image, "task": str(task), "modality": modality, "output_dir": str(out),
                 "weights": str(weights), "tta": as_bool(tta), "overlap": float(overlap), "overwrite": True,
                 "progress": as_bool(progress), "save_probabilities": as_bool(probabilities),
                 "sw_batch_size": int(sw_batch_size)}
    if device is not None:
        overrides["device"] = f"$torch.device('{device}')"
    start = time.perf_counter()
    _run_bundle(overrides)
    result = Prediction(label_map=str(planned["label_map"]), task=postfix, seconds=0.0)
    if "probabilities" in planned:
        result.probabilities = str(planned["probabilities"])
    from .report import label_volumes, render_preview, write_volume_tables

    result.volumes = label_volumes(planned["label_map"], names)
    write_volume_tables(result.volumes, planned["volumes_json"], planned["volumes_csv"])
    result.volumes_json, result.volumes_csv = str(planned["volumes_json"]), str(planned["volumes_csv"])
    if "preview" in planned:
        background = inputs[0] if not Path(inputs[0]).is_dir() else result.label_map
        render_preview(background, planned["label_map"], names, planned["preview"], title=f"UniSeg: {postfix}")
        result.preview = str(planned["preview"])
    result.seconds = round(time.perf_counter() - start, 2)
    return result


def quiet() -> None:
    """Silence MONAI's and ignite's loggers (they have their own handlers and levels, and log failures that we
    report ourselves in one line): people read our output."""
    for name in ["monai", "ignite", *logging.root.manager.loggerDict]:
        if name.split(".")[0] in ("monai", "ignite"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _run_bundle(overrides: dict) -> None:
    """Run ``configs/inference.json`` of the bundle with ``overrides``, quietly, raising one ``UnisegHubError``."""
    from monai.bundle import ConfigWorkflow

    root = bundle_dir()
    quiet()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            workflow = ConfigWorkflow(config_file=str(root / "configs" / "inference.json"),
                                      meta_file=str(root / "configs" / "metadata.json"), logging_file=False,
                                      workflow_type="infer", bundle_root=str(root), **overrides)
            workflow.initialize()
            quiet()  # the engines made their loggers just now
            workflow.run()
            workflow.finalize()
    except Exception as e:
        raise user_error(e) from e


def demo(weights: str | None = None, out_dir: str = "uniseg-demo", task: str = "liver", tta: bool = False,
         device: str | None = None, overwrite: bool = True, progress: bool = True) -> list[Prediction]:
    """Segment the sample CT (TotalSegmentator example, from PyPI, sha256-pinned) for ``task`` and for all CT tasks.

    ``weights``: a converted folder, or None for the default published model. The weights are checked first, so
    a machine without them learns that in one line before anything is downloaded.
    """
    from .sample_data import fetch_sample

    source = weights if weights is not None else _published_default()
    scan = fetch_sample("ct_small")
    return [predict(scan, t, out_dir, source, device=device, tta=tta, overwrite=overwrite, progress=progress)
            for t in (task, "all")]


def _published_default() -> str:
    """The default model's name once its file is downloaded and verified, or one error saying how to get weights."""
    from .errors import NotAvailableOfflineError, NotPublishedError
    from .hub import download

    try:
        download(DEFAULT_MODEL)
        return DEFAULT_MODEL
    except (NotPublishedError, NotAvailableOfflineError) as e:
        reason = "it is not published on the Hugging Face Hub yet" if isinstance(e, NotPublishedError) else \
            "it is not in the cache and the Hub cannot be reached"
        raise UnisegHubError(
            f"no UniSeg weights available ({DEFAULT_MODEL}: {reason}); either convert the official checkpoint "
            f"(uniseg-hub convert model_final_checkpoint.model ./{DEFAULT_MODEL}, then uniseg-hub demo --weights "
            f"./{DEFAULT_MODEL}) or publish a converted copy (uniseg-hub publish ./{DEFAULT_MODEL} --repo-id "
            "ORG/NAME) and add its manifest entry"
        ) from e
