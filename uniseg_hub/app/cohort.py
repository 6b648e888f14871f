"""Cohorts: ``uniseg-hub predict`` over a folder, a glob or a datalist, the model and pipeline built once.

One run of the bundle's ``inference.json`` (the one inference pipeline) over every case: the datalist is the
cohort's, the evaluator runs once, and its data loader reads and prepares the next case while the network works
on the current one (``loader``: DataLoader worker processes, or MONAI's ``ThreadDataLoader``). Two pieces make the
run survive a bad case: the dataset's transform is wrapped (``cases.GuardedTransform``: a case that cannot be read
or prepared becomes an item that says so), and the evaluator's iteration is ``CaseIteration``, which runs one case
inside its own output claim (``outputs.claim_outputs``, as a single prediction) and records a failure instead of
raising it. Each case's outputs are the single prediction's: label map, preview, volume tables.

Resume: a case whose planned outputs all exist and whose lock file is gone is complete and skipped (``overwrite``
redoes it); a partial one (some outputs missing, or the lock file of a killed run left) is redone from scratch.

Ranks: under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialised (NCCL with GPUs, else gloo), each
rank takes every N-th case (``cases.shard_cases``, as the bundle's sharded evaluation does) on its own GPU when
there is one, writes its own outputs, and rank 0 gathers the rows and writes the report. ``shard=(i, n)`` selects
the i-th of n parts first (SLURM arrays). The report is ``predict_report.json`` and ``.csv`` in the output folder
(``predict_report_shard-I-of-N.*`` for a shard).
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import PredictOptions
from ..errors import InputError, UnisegHubError, os_error_text
from ..files import write_text_atomic
from .outputs import check_names, check_space, claim_outputs, lock_path
from .predict import (
    _output_bytes,
    _typed,
    bundle_overrides,
    bundle_workflow,
    case_outputs,
    check_run,
    companions,
    quiet,
    unwrap_error,
    write_companions,
)

REPORT = "predict_report"
"""The report's file name in the output folder, without suffix."""

STATUSES = ("done", "skipped", "failed", "not run")
"""A case's status: segmented now; complete from an earlier run; failed (``error`` says why); not reached
(``fail_fast`` stopped the run first)."""

LOADERS = ("workers", "thread", "none")
"""How the next case is read and prepared while the network works: a DataLoader worker process, a thread
(``ThreadDataLoader``), or not ahead of time (in the main process, between cases)."""


@dataclass
class CaseResult:
    """One row of the report: ``seconds`` is the case's wall time in the main loop (network, postprocessing,
    writing), ``load_seconds`` its reading and preprocessing (overlapped with the previous case when a loader
    reads ahead), ``network_seconds`` the network's part (sliding windows)."""

    case: str
    status: str
    seconds: float = 0.0
    error: str = ""
    label_map: str = ""
    input: str = ""
    rank: int = 0
    load_seconds: float = 0.0
    network_seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class CohortReport:
    """The cases of a cohort run, in input order, and where the report was written (on the process that wrote it;
    ``main`` is False on the other ranks, which show nothing)."""

    cases: list[CaseResult]
    out_dir: str
    task: str = ""
    seconds: float = 0.0
    report_json: str | None = None
    report_csv: str | None = None
    shard: str | None = None
    ranks: int = 1
    main: bool = True
    counts: dict = field(default_factory=dict)

    @property
    def failed(self) -> list[CaseResult]:
        return [c for c in self.cases if c.status in ("failed", "not run")]

    @property
    def ok(self) -> bool:
        return not self.failed

    def as_dict(self) -> dict:
        out = asdict(self)
        out["ok"] = self.ok
        return out


def describe_error(error: BaseException) -> str:
    """One line for a case's failure: the uniseg-hub error (or ``OSError``) MONAI wrapped, else the unexpected
    error named as such (a bug, but only this case's)."""
    root = unwrap_error(error) if type(error) is RuntimeError else error
    if root is None:
        root = error
        while root.__cause__ is not None and type(root) is RuntimeError:
            root = root.__cause__
    if isinstance(root, OSError) and not isinstance(root, UnisegHubError):
        text = os_error_text(root)
    else:
        text = str(root)
    if not isinstance(root, (UnisegHubError, OSError)):
        text = f"unexpected {type(root).__name__}: {text}"
    return " ".join(text.split())


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    """``"i/n"`` (1 <= i <= n) as (i - 1, n); None for None. ``InputError`` for anything else."""
    if shard is None or str(shard).strip() == "":
        return None
    text = str(shard).strip()
    index, _, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i = n = 0
    if not (n >= 1 and 1 <= i <= n):
        raise InputError(f"--shard takes I/N with 1 <= I <= N (the I-th of N parts of the cases), got {text!r}")
    return i - 1, n


class _Ranks:
    """This process's place under ``torchrun``: the process group, started here if the environment asks for one
    (``WORLD_SIZE`` > 1) and ended again by ``close``."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.started = False
        wanted = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        if wanted and dist.is_available() and not dist.is_initialized():
            import torch

            if torch.cuda.is_available():  # NCCL's collectives run on this rank's GPU
                torch.cuda.set_device(self.local_rank % torch.cuda.device_count())
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
            self.started = True
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.size = dist.get_world_size() if self.active else 1

    def gather(self, value):
        """Every rank's ``value``, in rank order (on every rank)."""
        if not self.active:
            return [value]
        out = [None] * self.size
        self.dist.all_gather_object(out, value)
        return out

    def close(self) -> None:
        if self.started and self.dist.is_initialized():
            self.dist.destroy_process_group()


def _device(options: PredictOptions, ranks: _Ranks) -> str | None:
    """Each rank its own GPU: ``cuda:LOCAL_RANK`` when the device is CUDA (or left to the default and there is
    one); the device as given otherwise."""
    if ranks.size <= 1:
        return options.device
    import torch

    if options.device is None and torch.cuda.is_available() or str(options.device) in ("cuda", "cuda:0"):
        return f"cuda:{ranks.local_rank}"
    return options.device


def _planned(layout, probabilities_layout, subject: str, options: PredictOptions) -> dict[str, str]:
    planned = {"label_map": layout.filename(subject=subject)}
    if options.probabilities:
        planned["probabilities"] = probabilities_layout.filename(subject=subject)
    planned.update(companions(layout, planned["label_map"], options.preview, options.format))
    return planned


def is_complete(planned: dict[str, str]) -> bool:
    """Every planned output exists and no run is writing them or was killed writing them (no lock file)."""
    return all(os.path.isfile(p) for p in planned.values()) and not lock_path(planned["label_map"]).exists()


class CaseIteration:
    """The evaluator's iteration for a cohort (``SupervisedEvaluator(iteration_update=...)``): one case inside its
    output claim, its failure recorded rather than raised.

    The outputs of the case are claimed (``claim_outputs``: the lock, the names, the free space), any partial set is
    removed, then the evaluator's own iteration runs (the network, then the bundle's postprocessing that writes the
    label map), then the preview and the volume tables are written. A failure anywhere removes the case's outputs
    (the claim does) and becomes the case's row; ``fail_fast`` ends the run after it.
    """

    def __init__(self, options: PredictOptions, layout, probabilities_layout, names, postfix: str, tasks,
                 rank: int = 0, fail_fast: bool = False, on_case: Callable | None = None, total: int = 0):
        self.options, self.layout, self.probabilities_layout = options, layout, probabilities_layout
        self.names, self.postfix, self.rank = names, postfix, rank
        self.tasks = tasks  # the run's tasks: the preview's window and colours
        self.fail_fast, self.on_case, self.total = fail_fast, on_case, total
        self.results: list[CaseResult] = []
        self._forward_done: float | None = None

    def attach(self, engine) -> None:
        from monai.engines.utils import IterationEvents

        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self._forward_completed)

    def _forward_completed(self, engine) -> None:
        self._forward_done = time.perf_counter()

    def __call__(self, engine, batch: dict):
        start = time.perf_counter()
        self._forward_done = None
        case = str(batch["case"][0])
        subject = str(batch["case_subject"][0])
        result = CaseResult(case=case, status="done", input=subject, rank=self.rank)
        load = batch.get("case_load_seconds")
        result.load_seconds = round(float(load[0]) if load is not None else 0.0, 3)
        output = None
        if "case_error" in batch:  # it failed in the loader (reading, preprocessing): nothing was written
            result.status, result.error = "failed", str(batch["case_error"][0])
            return self._finish(engine, result, start, output)
        try:
            planned = _planned(self.layout, self.probabilities_layout, subject, self.options)
            check_names(planned)
            with claim_outputs(planned):
                for path in planned.values():  # a partial set (or one to overwrite) is redone from scratch
                    if os.path.lexists(path):
                        os.unlink(path)
                check_space(self.options.out_dir, _output_bytes(subject, self.options, len(self.names)))
                output = engine._iteration(engine, batch)
                item = engine.state.batch[0] if isinstance(engine.state.batch, list) else engine.state.batch
                out = engine.state.output[0] if isinstance(engine.state.output, list) else engine.state.output
                model = getattr(engine.network, "model", engine.network)  # the predictor's network: its version
                written = write_companions(case_outputs({**item, **out}), self.options, self.layout, self.names,
                                           self.postfix, model, self.tasks, subject)
                result.label_map = written.label_map
        except Exception as e:  # this case's failure: recorded, the others go on
            result.status, result.error = "failed", describe_error(e)
        return self._finish(engine, result, start, output)

    def _finish(self, engine, result: CaseResult, start: float, output):
        result.seconds = round(time.perf_counter() - start, 3)
        if self._forward_done is not None:
            result.network_seconds = round(self._forward_done - start, 3)
        self.results.append(result)
        if self.on_case is not None:
            self.on_case(result, self.total)
        if result.status == "failed" and self.fail_fast:
            engine.terminate()
        return output


def predict_cohort(
    inputs: Sequence[str] | str,
    *,
    fail_fast: bool = False,
    shard: str | None = None,
    loader: str = "workers",
    on_case: Callable[[CaseResult, int], None] | None = None,
    **options,
) -> CohortReport:
    """Segment every case of a folder, a glob or a datalist (``cases.discover_cases``) in one run of the bundle.

    ``options`` are ``predict``'s keywords (``config.PredictOptions``: task, out_dir, weights, device, tta, ...;
    no per-window progress bar: the command line counts cases); each case gets the single prediction's outputs in
    ``out_dir``. ``fail_fast`` stops at the first failed case (the rest are ``not run``); otherwise a failed case is
    reported and the others complete. ``shard`` (``"i/n"``) takes the i-th of n deterministic parts.
    ``on_case(result, total)`` is called after each case of this process (skipped ones first). Returns the report
    (also written as ``predict_report.json`` / ``.csv``); ``InputError`` for what makes every case impossible (no
    case, a task that takes another channel count, an unusable device or output folder).
    """
    from ..pipeline.cases import case_name, case_subject, count_channels, discover_cases, shard_cases

    options = PredictOptions(**{**options, "progress": False})
    if loader not in LOADERS:
        raise InputError(f"loader must be one of {', '.join(LOADERS)}, got {loader!r}")
    part = parse_shard(shard)
    inputs = [os.fspath(inputs)] if isinstance(inputs, (str, os.PathLike)) else [os.fspath(p) for p in inputs]
    everything = discover_cases(inputs)
    check_run(options)
    start = time.perf_counter()
    ranks = _Ranks()
    try:
        mine = shard_cases(everything, *part) if part else list(everything)
        mine = shard_cases(mine, ranks.rank, ranks.size)
        rows = _run(mine, options, ranks, fail_fast, loader, on_case, count_channels)
        gathered = [row for part_rows in ranks.gather([r.as_dict() for r in rows]) for row in part_rows]
    finally:
        ranks.close()
    order = {case_name(case_subject(c)): i for i, c in enumerate(everything)}
    results = sorted((CaseResult(**r) for r in gathered), key=lambda r: order.get(r.case, len(order)))
    label = None if part is None else f"{part[0] + 1}/{part[1]}"
    report = CohortReport(cases=results, out_dir=options.out_dir, shard=label, ranks=ranks.size,
                          main=ranks.rank == 0, seconds=round(time.perf_counter() - start, 2),
                          task=_task_label(options, results))
    report.counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    if report.main:
        name = REPORT if part is None else f"{REPORT}_shard-{part[0] + 1}-of-{part[1]}"
        report.report_json, report.report_csv = write_report(report, Path(options.out_dir) / name)
    return report


def _task_label(options: PredictOptions, results: list[CaseResult]) -> str:
    return str(options.task)


def _run(cases: list[dict], options: PredictOptions, ranks: _Ranks, fail_fast: bool, loader: str,
         on_case: Callable | None, count_channels) -> list[CaseResult]:
    """This process's cases: the complete ones skipped, the others through one run of the bundle."""
    from ..pipeline.cases import case_name, case_subject

    rows: list[CaseResult] = []
    if not cases:
        return rows
    channels = None
    for case in cases:  # the task's channel count, from the first case whose header reads
        try:
            channels = count_channels([case])
            break
        except (UnisegHubError, OSError):
            continue
    overrides = bundle_overrides(options, [case_subject(cases[0])])
    overrides.update(input="", datalist=cases, overwrite=True, progress=False)
    if channels is not None:
        overrides["tasks"] = f"$uniseg_hub.pipeline.resolve_tasks(@task, @modality, {int(channels)}, @task_table)"
    device = _device(options, ranks)
    if device is not None:
        overrides["device"] = f"$torch.device({device!r})"
    workflow = _typed(bundle_workflow, overrides)
    parsed = lambda name: _typed(workflow.parser.get_parsed_content, name)  # noqa: E731
    postfix, names, layout = parsed("output_postfix"), parsed("label_names"), parsed("label_layout")
    probabilities_layout = parsed("probabilities_layout")
    pending = []
    for case in cases:
        subject = case_subject(case)
        planned = _planned(layout, probabilities_layout, subject, options)
        if not options.overwrite and is_complete(planned):
            rows.append(CaseResult(case=case_name(subject), status="skipped", input=subject, rank=ranks.rank,
                                   label_map=planned["label_map"]))
        else:
            pending.append(case)
    for row in rows:
        if on_case is not None:
            on_case(row, len(cases))
    if not pending:
        return rows
    iteration = CaseIteration(options, layout, probabilities_layout, names, postfix, parsed("tasks"),
                              rank=ranks.rank, fail_fast=fail_fast, on_case=on_case, total=len(cases))
    workflow.parser["datalist"] = pending
    workflow.parser["dataset#transform"] = ("$uniseg_hub.pipeline.cases.GuardedTransform(@preprocessing, "
                                            "uniseg_hub.app.cohort.describe_error)")
    workflow.parser["evaluator#iteration_update"] = iteration
    if loader == "thread":
        workflow.parser["dataloader#_target_"] = "ThreadDataLoader"
        workflow.parser["num_workers"] = 0
        workflow.parser["dataloader#buffer_size"] = 1
    else:
        workflow.parser["num_workers"] = 1 if loader == "workers" and len(pending) > 1 else 0
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluator = _typed(lambda: workflow.evaluator)
        iteration.attach(evaluator)
        quiet()
        _typed(workflow.run)
        _typed(workflow.finalize)
    rows.extend(iteration.results)
    done = {r.case for r in rows}
    rows.extend(CaseResult(case=case_name(case_subject(c)), status="not run", input=case_subject(c), rank=ranks.rank,
                           error="not run: --fail-fast stopped at an earlier failure")
                for c in pending if case_name(case_subject(c)) not in done)
    return rows


FIELDS = ("case", "status", "seconds", "error", "label_map", "input", "rank", "load_seconds", "network_seconds")


def write_report(report: CohortReport, stem: Path) -> tuple[str, str]:
    """``<stem>.json`` (the whole report) and ``<stem>.csv`` (one row per case), each written atomically."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".csv")
    document = {k: v for k, v in report.as_dict().items() if k not in ("report_json", "report_csv")}
    write_text_atomic(json_path, json.dumps(document, indent=2) + "\n")
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in report.cases:
        writer.writerow({k: getattr(row, k) for k in FIELDS})
    write_text_atomic(csv_path, text.getvalue())
    return str(json_path), str(csv_path)


__all__ = ["CaseResult", "CohortReport", "predict_cohort", "describe_error", "parse_shard", "is_complete",
           "write_report"]
