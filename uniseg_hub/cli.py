"""The ``uniseg-hub`` command line: a thin ``fire`` layer over the package's functions.

Exit codes: 0 success, 1 failure (one line on stderr, no traceback), 2 usage error (unknown command or option, a
missing or extra argument, an option given twice or with a value of the wrong kind), rejected before anything
runs; 130 Ctrl-C, 143 SIGTERM, 141 when stdout's reader went away. ``predict`` over a cohort (a folder, glob or
datalist) exits 1 when any case failed, after printing the report table (every case's status) on stdout.
Help goes to stdout; only results do besides.
Every command has ``--help``. Values stay the strings that were typed (fire alone would turn ``--revision 1e5``
into a float). Commands import what they need when they run, so ``list``, ``info``, ``download``, ``verify`` and
``path`` start without importing torch.

Conventions for a command (see ``guard_args``): required inputs are positional parameters, options are
keyword-only with defaults, a flag is an option whose default is a bool, option values arrive as the strings typed
unless annotated ``int`` or ``float``, the docstring's Args become ``--help``.
"""

import contextlib
import inspect
import json as jsonlib
import logging
import os
import signal
import sys

import fire

from .errors import Interrupted, UnisegHubError, os_error_text
from .files import format_json

_STDOUT: list = []
"""The real standard output while ``main`` runs a command (``sys.stdout`` then points at stderr, so that nothing
a library prints or logs reaches a script reading ``--json``); empty outside ``main``."""


def emit(result, as_json: bool, text: str) -> None:
    """Print ``text`` for people, or ``result`` as JSON for programs, in the one layout the command line prints
    JSON in (``files.format_json``, the manifest's). A JSON round trip first makes keys strings and tuples lists."""
    out = _STDOUT[-1] if _STDOUT else sys.stdout
    print(format_json(jsonlib.loads(jsonlib.dumps(result))) if as_json else text, file=out)
    out.flush()  # a closed pipe (`| head -1`) fails here, inside main, not at exit


def list_models(*, manifest=None, json: bool = False) -> None:
    """List the models that can be loaded by name, published on the Hub or not.

    Args:
        manifest: another weights manifest than UNISEG_HUB_MANIFEST or the one shipped with uniseg-hub.
        json: print the list as JSON.
    """
    from .hub import load_manifest

    m = load_manifest(manifest)
    rows = [{"name": e.name, "published": e.published, "repo_id": e.repo_id, "revision": e.revision,
             "size": e.size, "license": e.license.name, "commercial_use": e.license.commercial_use,
             "description": e.description} for e in m.models.values()]

    def line(row: dict) -> str:
        size = "" if row["size"] is None else f"{row['size'] / 1e6:.1f} MB  "
        status = "published" if row["published"] else "not published"
        return f"{row['name']}  {status}  {size}{row['license']}\n  {row['description']}"

    lines = [line(r) for r in rows]
    emit(rows, json, "\n".join(lines + [f"(manifest: {m.path})"]))


def info(name: str, *, cache_dir=None, manifest=None, json: bool = False) -> None:
    """Show a model's manifest entry: repository and commit, file, licence, architecture, preprocessing, tasks,
    source, and whether it is in the cache; or, for a model folder or Hub repository, its configuration and tasks.

    Args:
        name: a model name (see `uniseg-hub list`), a folder written by `uniseg-hub convert` or `add-task`, or a Hub
            repository (ORG/NAME[@REVISION]).
        cache_dir: the huggingface_hub cache to look in (default HF_HUB_CACHE).
        manifest: another weights manifest than UNISEG_HUB_MANIFEST or the shipped one.
        json: print the entry (plus "cache") as JSON; for a folder its config.json with the task table ("tasks").
    """
    from .hub import load_manifest, manifest_entry
    from .upstream import cache_status

    if os.path.exists(name) or name not in load_manifest(manifest).models:
        from .pretrained import checkpoint_info

        document = checkpoint_info(name, cache_dir=cache_dir, manifest=manifest)
        tasks = document["tasks"] or []
        lines = [f"{name}: {document['architecture']} " + ", ".join(f"{k} {v}" for k, v in document["config"].items()
                                                                  if k in ("features", "patch_size", "added_tasks")),
                 f"tasks ({len(tasks)}):" if tasks else "tasks: none (a downstream backbone)",
                 *[f"  {t['name']} ({t['id']}): {t['group']}, channels {t['channels']}, spacing {t['spacing']} mm, "
                   f"labels {t['labels']}" for t in tasks]]
        emit(document, json, "\n".join(lines))
        return
    entry = manifest_entry(name, manifest)
    status = cache_status(name, cache_dir, manifest)
    arch, pre, src, lic = (entry.architecture.to_dict(), entry.preprocessing.to_dict(), entry.source,
                           entry.license)
    where = (f"{entry.repo_id} at commit {entry.revision}, {entry.filename} ({entry.size} bytes, "
             f"sha256 {entry.sha256})" if entry.published
             else f"not published on the Hub (original: {src['original_url']})")
    tasks = pre.get("tasks", {})
    lines = [
        f"{entry.name}: {entry.description}",
        f"weights: {where}",
        f"licence: {lic.name} ({'commercial use allowed' if lic.commercial_use else 'non-commercial only'}) "
        f"{lic.url}",
        f"architecture: {arch['architecture']} " + ", ".join(f"{k} {v}" for k, v in arch["config"].items()),
        f"preprocessing: axis order {pre['axis_order']}" + (f"; patch {pre['patch_size']}" if "patch_size" in pre
                                                            else ""),
        *[f"  {t}: channels {v['channels']}, spacing {v['spacing']} mm, {'/'.join(v['normalization'])}"
          for t, v in tasks.items()],
        f"source: {src['paper']}; {src['code']} @ {src['code_commit']}",
        "cache: " + (f"{status['path']} ({'verified' if status['verified'] else 'not verified yet'})"
                     if status["path"] else "not downloaded"),
    ]
    emit({**entry.to_dict(), "cache": status}, json, "\n".join(lines))


def download(name: str, *, revision=None, cache_dir=None, force: bool = False, local_files_only: bool = False,
             manifest=None, json: bool = False) -> None:
    """Download a model's weights into the Hugging Face cache, check size and sha256, print the file's path. A model
    that is not on the Hub but names its original checkpoint (upstream) is fetched from there, verified and converted
    once into UNISEG_HUB_CACHE (default HF_HUB_CACHE/uniseg-hub).

    Honours HF_ENDPOINT, HF_HOME / HF_HUB_CACHE, HF_TOKEN, HF_HUB_OFFLINE and HTTPS_PROXY / NO_PROXY. A cached
    file at the pinned commit needs no network: run this where the network is, copy the cache, use it offline.

    Args:
        name: a model name (see `uniseg-hub list`).
        revision: a commit, branch or tag instead of the manifest's pinned commit.
        cache_dir: the huggingface_hub cache to use (default HF_HUB_CACHE).
        force: download (and convert) again even if cached.
        local_files_only: do not use the network (like HF_HUB_OFFLINE=1).
        manifest: another weights manifest than UNISEG_HUB_MANIFEST or the shipped one.
        json: print name, path, sha256 and size as JSON.
    """
    from .hub import manifest_entry
    from .upstream import download as fetch

    path = fetch(name, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, force=force,
                 manifest=manifest)
    entry = manifest_entry(name, manifest)
    emit({"name": name, "path": str(path), "repo_id": entry.repo_id, "revision": revision or entry.revision,
          "sha256": entry.sha256, "size": path.stat().st_size}, json, str(path))


def verify(name: str, *, cache_dir=None, manifest=None, json: bool = False) -> None:
    """Hash a model's cached file against the manifest, or a converted original against the sha256 recorded at
    conversion (no network); exit 1 if it is missing or corrupt.

    Args:
        name: a model name (see `uniseg-hub list`).
        cache_dir: the huggingface_hub cache to check (default HF_HUB_CACHE).
        manifest: another weights manifest than UNISEG_HUB_MANIFEST or the shipped one.
        json: print name, path, sha256 and size as JSON.
    """
    from .files import sha256_file
    from .hub import manifest_entry
    from .upstream import verify as check

    path = check(name, cache_dir=cache_dir, manifest=manifest)
    entry = manifest_entry(name, manifest)
    # a converted original has no sha256 in the manifest: its own, as checked against its record
    sha256, size = (entry.sha256, entry.size) if entry.published else (sha256_file(path), path.stat().st_size)
    emit({"name": name, "path": str(path), "sha256": sha256, "size": size, "ok": True}, json,
         f"{name}: {path} is intact (sha256 {sha256}, {size} bytes)")


def path(name=None, *, cache_dir=None, manifest=None, json: bool = False) -> None:
    """Print where a model's verified file is in the cache (hashed against the manifest; never downloads, never
    deletes: a corrupt file is reported), or the cache folder without NAME.

    Args:
        name: a model name (see `uniseg-hub list`); omit it for the cache folder itself.
        cache_dir: the huggingface_hub cache (default HF_HUB_CACHE, i.e. $HF_HOME/hub).
        manifest: another weights manifest than UNISEG_HUB_MANIFEST or the shipped one.
        json: print {"name", "path"} as JSON.
    """
    from .hub import cache_folder
    from .upstream import verify as check

    if name is None:
        found = cache_folder(cache_dir)
    else:  # checked, never changed: a corrupt file is reported (and kept), not deleted
        found = check(name, cache_dir=cache_dir, manifest=manifest)
    emit({"name": name, "path": str(found)}, json, str(found))


def convert(src: str, out_dir: str, *, overwrite: bool = False, json: bool = False) -> None:
    """Convert an official UniSeg checkpoint (nnU-Net v1 .model file) into a safetensors folder.

    The file is read with an allow-listed weights-only load (no pickled code runs); the architecture is read from
    the tensor shapes; OUT_DIR receives model.safetensors and config.json.

    Args:
        src: the official .model file (e.g. model_final_checkpoint.model from the UniSeg release).
        out_dir: folder to write; load it with uniseg_hub.load_model(OUT_DIR) or load_encoder(OUT_DIR).
        overwrite: replace model.safetensors/config.json already in OUT_DIR.
        json: print the result as JSON.
    """
    from .files import sha256_file
    from .weights import WEIGHTS_FILE, convert_checkpoint, read_folder

    out = convert_checkpoint(src, out_dir, overwrite=overwrite)
    checkpoint = read_folder(out)  # read back: what was written loads
    weights = out / WEIGHTS_FILE
    result = {
        **checkpoint.config.to_dict(), "folder": str(out), "tensors": len(checkpoint.state),
        "parameters": sum(t.numel() for t in checkpoint.state.values()), "sha256": sha256_file(weights),
        "size": weights.stat().st_size, "source": checkpoint.document["source"],
    }
    emit(result, json, f"converted {src} -> {out} ({result['architecture']}, {result['tensors']} tensors, "
                       f"{result['parameters']:,} parameters, sha256 {result['sha256']})")


def publish(folder: str, *, repo_id: str, name=None, description=None, source_url=None, bundle_dir=None,
            bundle: bool = True, tag=None, out_dir=None, dry_run: bool = False, private: bool = False, manifest=None,
            json: bool = False) -> None:
    """Publish a converted folder as a Hugging Face Hub repository and print its manifest entry.

    The repository gets model.safetensors, config.json, a model card README.md (licence: UniSeg's non-commercial
    terms) and the MONAI bundle (configs/, docs/, LICENSE, models/, large_files.yml), so that uniseg-hub,
    monai.bundle.download(source="huggingface_hub") and monai.bundle.load all load it. The upload is one commit
    after which the repository holds exactly these files, tagged v<package version>; it needs a token with write
    access (`hf auth login` or HF_TOKEN). The entry printed afterwards pins that commit.

    Args:
        folder: written by `uniseg-hub convert`.
        repo_id: ORG/NAME on the Hub (created if needed).
        name: the model's name in the manifest (default: NAME, lower-cased).
        description: the entry's description (default: from the manifest entry of that name).
        source_url: where the original checkpoint comes from (the entry's source.original_url).
        bundle_dir: the MONAI bundle to include (default: the repository's bundle/ when it exists).
        bundle: --nobundle publishes the model files only.
        tag: the tag that marks the commit (default v<package version>); a tag the repository has is refused.
        out_dir: build the repository folder here (default: a temporary folder, kept for --dry-run).
        dry_run: build the folder and print the entry it would add; upload nothing.
        private: create the repository as private.
        manifest: the manifest that lends the entry's details (default: UNISEG_HUB_MANIFEST or the shipped one).
        json: print the result as JSON.
    """
    from .app.publish import publish as run

    result = run(folder, repo_id, name=name, description=description, source_url=source_url,
                 bundle_dir=bundle_dir, bundle=bundle, tag=tag, out_dir=out_dir, dry_run=dry_run, private=private,
                 manifest=manifest)
    bundle_note = (f"with the MONAI bundle from {result['bundle']}" if result["bundle"] else
                   "model files only, no MONAI bundle (" + ("--nobundle" if not bundle else
                                                            "no bundle/ folder here; pass --bundle-dir") + ")")
    lines = [f"{'built' if dry_run else 'published'} {len(result['files'])} files, {bundle_note}"
             + (f", in {result['folder']}" if result["folder"] else "") + ":",
             *[f"  {f}" for f in result["files"]]]
    if dry_run:
        lines.append(f"dry run: nothing uploaded; the entry's revision is the commit that the upload to "
                     f"{result['repo_id']} will create")
    else:
        lines.append(f"uploaded to {result['repo_id']} at commit {result['commit']}, tagged {result['tag']}: "
                     f"{result['url']}")
    entry = result["entry"].to_dict()
    lines += ["manifest entry (add it to the models list of weights_manifest.json):", format_json(entry)]
    if result["large_files"]:
        lines += [f"the bundle's large_files.yml (in the repository; for a copy of the bundle elsewhere), at tag "
                  f"{result['tag']}:", "large_files:"]
        for item in result["large_files"]:
            lines += [f"  - {k}: \"{v}\"" if k == "path" else f"    {k}: \"{v}\"" for k, v in item.items()]
    emit({**result, "entry": entry}, json, "\n".join(lines))


def predict(*inputs: str, task: str = "liver", out: str = "uniseg-output", model: str = "uniseg-11task",
            device=None, tta: int | str = 8, overlap: float = 0.5, probabilities: bool = False, preview: bool = True,
            overwrite: bool = False, progress: bool = True, modality: str = "CT", resampling: str = "nnunet",
            nan: str = "zero", normalization_mask: str = "training", window: str = "nnunet",
            format: str = "nifti", precision: str = "auto", fast: bool = False, json: bool = False,
            fail_fast: bool = False, shard=None, loader: str = "workers") -> None:
    """Segment a scan, or a cohort of scans, for one task or all tasks: label map, PNG preview and label volumes.

    INPUT is a NIfTI file, a DICOM series folder, or one file per channel for multi-channel tasks (brats: T1, T1ce,
    T2, FLAIR; autopet: CT, PET), on one grid. Runs the MONAI bundle's inference config.

    A cohort is a folder of NIfTI files (nnU-Net's case_0000.nii.gz, case_0001.nii.gz ... are the channels of one
    case) or of DICOM series (one per subfolder), a quoted glob ('scans/*.nii.gz'), or a datalist (.json: MONAI's
    Decathlon format, cases under "testing"; .csv: one case per row, an image column, or image_0000,
    image_0001 ... columns for the channels). The model loads once; the next case is read while the network
    works. A failed case is reported and skipped; at the end a table (case, status, seconds, error) is printed and
    written as predict_report.json/.csv in the output folder. Exit status 0 when every case succeeded (or was
    complete already), 1 when any failed. Rerunning the command skips the complete cases and redoes partial ones.
    Under torchrun the cases are split over the ranks (one GPU each), and rank 0 writes the report.

    Args:
        inputs: the scan: one file or folder, or one file per channel; or a cohort (folder, glob, datalist).
        task: liver, kidney, hepatic_vessel, pancreas, colon, lung, spleen, vertebrae, prostate, brats, autopet, an
            id 0-10, a task the model adds (`uniseg-hub info MODEL` lists them), or all (every task of the input's
            modality and channel count; the encoder is shared).
        out: output folder; <case>_<task>.nii.gz, _preview.png, _volumes.json/.csv (and _probabilities.nii.gz).
        model: a model name of the manifest (see `uniseg-hub list`), a folder written by `uniseg-hub convert`, or a
            Hub repository written by `uniseg-hub publish` (ORG/NAME or ORG/NAME@REVISION).
        device: cpu, cuda or cuda:N (default: cuda when available).
        tta: mirror test-time augmentation: 8 flips over all three axes (official), 4 (x and y), 2 (x) or 1 (none,
            8x faster); --tta / --notta (true/false) are 8 / 1.
        overlap: sliding-window overlap (official 0.5, nnU-Net's step size 1 - overlap: windows at most half a patch
            apart).
        probabilities: also write the probabilities on the input's grid (one task; refused for --task all).
        preview: write the PNG preview.
        overwrite: replace existing outputs.
        progress: show progress bars on stderr when it is a terminal: one case gets reading, preprocessing,
            sliding window (with the number of windows) and writing; a cohort one bar over its cases.
        modality: CT or MR, the group --task all uses for 1-channel input.
        resampling: nnunet (official: edge-aligned grid, cubic spline, nearest along the slice axis of anisotropic
            scans) or monai (MONAI's Spacingd, trilinear; a deviation).
        nan: zero (official: NaN voxels count as 0, with a warning) or refuse (an error).
        normalization_mask: training (BraTS z-scored over non-zero voxels, as the weights were trained) or none
            (over the whole image, as the official predict.py does).
        window: nnunet (official: nnU-Net v1's evenly spread windows and Gaussian weighting) or monai (MONAI's
            SlidingWindowInferer: other positions and Gaussian map; a deviation).
        format: nifti (the label map with its colour tables for 3D Slicer and ITK-SNAP), seg.nrrd (also a 3D Slicer
            segmentation file with names and colours) or dicom-seg (also a DICOM Segmentation referencing the
            input series; DICOM series input only, needs uniseg-hub[dicom]).
        precision: auto (official: float16 autocast on CUDA, float32 on CPU), fp32, bf16 (opt-in on CPU: fast where
            the CPU has AMX or AVX512_BF16) or fp16 (CUDA only).
        fast: the fast preset: overlap 0.25 unless given otherwise, the one choice that kept every label's Dice
            against the official settings at 0.98 or better on the sample CT (fewer flips and bf16 did not; README,
            Performance). Fewer windows on large scans; on scans under two patches per axis the same windows.
        json: print the result as JSON.
        fail_fast: cohorts: stop at the first failed case (the others are reported as not run).
        shard: cohorts: I/N runs the I-th of N deterministic parts of the cases (SLURM arrays; report
            predict_report_shard-I-of-N.*).
        loader: cohorts: how the next case is read while the network works: workers (a DataLoader worker
            process), thread (MONAI's ThreadDataLoader) or none.
    """
    from .app.predict import predict as run
    from .app.predict import quiet
    from .config import PredictOptions, parse_bool
    from .errors import ConfigError

    try:  # a wrong option value is a usage error, found before anything is loaded
        PredictOptions(task=task, out_dir=out, weights=model, device=device, tta=tta, overlap=overlap,
                       probabilities=probabilities, preview=preview, overwrite=overwrite, progress=progress,
                       modality=modality, resampling=resampling, nan=nan, normalization_mask=normalization_mask,
                       window=window, format=format, precision=precision, fast=fast)
    except ConfigError as e:
        usage_error("predict", " ".join(str(e).split()))
    # --- cohorts (issue 16): a folder, glob or datalist; everything else is one case, as before ---
    from .app.cohort import LOADERS, parse_shard
    from .errors import InputError
    from .pipeline.cases import is_cohort

    try:
        parse_shard(shard)
    except InputError as e:
        usage_error("predict", " ".join(str(e).split()))
    if loader not in LOADERS:
        usage_error("predict", f"--loader takes {', '.join(LOADERS)}, got {loader!r}")
    quiet()

    if is_cohort(list(inputs)) or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        _predict_cohort(list(inputs), json=json, progress=progress, fail_fast=fail_fast, shard=shard,
                        loader=loader, task=task, out_dir=out, weights=model, device=device, tta=tta,
                        overlap=overlap, probabilities=probabilities, preview=preview, overwrite=overwrite,
                        modality=modality, resampling=resampling, nan=nan, normalization_mask=normalization_mask,
                        window=window, format=format, precision=precision, fast=fast)
        return
    # --- one case: its stage bars only on a terminal (a log or a pipe gets the result and error lines alone) ---
    result = run(list(inputs), task=task, out_dir=out, weights=model, device=device, tta=tta, overlap=overlap,
                 probabilities=probabilities, preview=preview, overwrite=overwrite,
                 progress=parse_bool(progress, "progress") and _terminal(sys.stderr),
                 modality=modality, resampling=resampling, nan=nan, normalization_mask=normalization_mask,
                 window=window, format=format, precision=precision, fast=fast)
    emit(result.as_dict(), json, _describe(result))


def _predict_cohort(inputs: list[str], *, json: bool, progress, fail_fast, shard, loader, **options) -> None:
    """``predict`` over a cohort: a progress bar over the cases (stderr, rank 0), the report table (stdout), and
    exit status 1 with one line when a case failed."""
    from .app.cohort import predict_cohort
    from .config import parse_bool

    show = parse_bool(progress, "progress")  # checked with the other options
    main_rank = int(os.environ.get("RANK", "0") or 0) == 0
    bar = []

    def on_case(result, total: int) -> None:
        if not (show and main_rank):
            return
        if not bar:
            from tqdm import tqdm

            bar.append(tqdm(total=total, unit="case", file=sys.stderr, dynamic_ncols=True, desc="cases"))
        bar[0].set_postfix_str(f"{result.case}: {result.status}", refresh=False)
        bar[0].update(1)

    try:
        report = predict_cohort(inputs, fail_fast=fail_fast, shard=shard, loader=loader, on_case=on_case, **options)
    finally:
        if bar:
            bar[0].close()
    if report.main:
        emit(report.as_dict(), json, _cohort_table(report))
    if not report.ok:
        if not report.main:
            raise SystemExit(1)
        failed = [c for c in report.cases if c.status == "failed"]
        first = f" (first: {failed[0].case}: {failed[0].error})" if failed else ""
        _fail(f"{len(failed)} of {len(report.cases)} cases failed{first}; the others are done; see "
              f"{report.report_csv}")


def _terminal(stream) -> bool:
    """Whether ``stream`` is a terminal (where progress bars go; a closed or odd stream is not)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _cohort_table(report) -> str:
    """The cohort's report as an aligned table (case, status, seconds, error), then one summary line."""
    head = ("case", "status", "seconds", "error")
    body = [(c.case, c.status, f"{c.seconds:.1f}", c.error) for c in report.cases]
    widths = [max(len(line[i]) for line in (head, *body)) for i in range(3)]
    lines = ["  ".join([line[0].ljust(widths[0]), line[1].ljust(widths[1]), line[2].rjust(widths[2]),
                        line[3]]).rstrip() for line in (head, *body)]
    counts = ", ".join(f"{n} {s}" for s, n in report.counts.items() if n)
    shard = f" (shard {report.shard})" if report.shard else ""
    ranks = f" on {report.ranks} ranks" if report.ranks > 1 else ""
    lines.append(f"{len(report.cases)} cases{shard}{ranks}: {counts or 'none'} in {report.seconds:.1f} s; report: "
                 f"{report.report_csv}")
    return "\n".join(lines)


def _describe(result) -> str:
    lines = [f"{result.task}: {result.label_map} ({result.seconds:.1f} s)"]
    lines += [f"  {name}: {path}" for name, path in (("preview", result.preview), ("volumes", result.volumes_csv),
                                                      ("probabilities", result.probabilities)) if path]
    lines += [f"  {name}: {path}" for name, path in (("segmentation", result.converted),
                                                      ("colours", result.colour_table)) if path]
    lines += _volume_table(result.volumes)
    return "\n".join(lines)


def _volume_table(volumes) -> list[str]:
    """The segmented labels' volumes as an aligned table (columns as wide as their longest entry)."""
    rows = [(str(r["label"]), r["name"], f"{r['volume_ml']:.1f} mL") for r in volumes if r["voxels"]]
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return [f"  {a.rjust(widths[0])}  {b.ljust(widths[1])}  {c.rjust(widths[2])}" for a, b, c in rows]


def demo(*, weights=None, out: str = "uniseg-demo", task: str = "liver", tta: bool = False, device=None,
         json: bool = False) -> None:
    """Segment the sample CT (TotalSegmentator example from PyPI) for an abdominal task and for all CT tasks.

    Uses the default published model, or --weights DIR (a folder written by `uniseg-hub convert` from the
    official checkpoint). Says first (stderr, `note:` lines) what it downloads, how big it is, and about how long
    the run will take (one window timed on this machine). Prints where the label maps, previews and volume tables
    are, then the Dice of each organ against TotalSegmentator's label map of the same scan (liver, kidney,
    pancreas, spleen): high values mean the weights work.

    Args:
        weights: a converted folder instead of the published model.
        out: output folder (existing demo outputs are replaced).
        task: the single task to run besides all CT tasks.
        tta: 8-flip test-time augmentation (off by default here: 8x faster on a CPU).
        device: cpu, cuda or cuda:N.
        json: print the results as JSON.
    """
    from .app.demo import plan_downloads, prepare_demo, run_demo
    from .app.predict import quiet

    quiet()
    for item in plan_downloads(weights):
        _note(_download_line(item))
    setup = prepare_demo(weights, task, tta=tta, device=device)
    _note(_estimate_line(setup))
    logging.getLogger("uniseg_hub.pipeline.sliding_window").setLevel(logging.WARNING)  # the estimate is out already
    result = run_demo(setup, out, tta=tta, device=device, progress=_terminal(sys.stderr))
    emit(result.as_dict(), json, "\n".join([*(_describe(r) for r in result.predictions),
                                            _agreement_table(result.agreement)]))


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


def _size(size) -> str:
    return f"{size / 1e6:.1f} MB"


def _download_line(item) -> str:
    if item.cached:
        return f"{item.what}: in {item.source}, nothing to download"
    size = _size(item.size) if item.size is not None else item.detail or "size unknown"
    return f"downloads {item.what} from {item.source} ({size})"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{minutes // 60} h {minutes % 60} min"


def _estimate_line(setup) -> str:
    if not setup.estimates:
        return "no run-time estimate"
    runs = "; ".join(f"{e.task}: {e.windows} window{'s' * (e.windows != 1)} x {e.seconds_per_window:.1f} s"
                     for e in setup.estimates)
    return (f"the run on {setup.window.device} will take about {_duration(setup.seconds)} ({runs}; one window "
            f"timed on this machine)")


def _agreement_table(rows) -> str:
    """Dice per organ against TotalSegmentator's map, as an aligned table."""
    if not rows:
        return "no organ of these tasks is in TotalSegmentator's label map: no agreement to show"
    head = ("case", "task", "organ", "Dice", "UniSeg mL", "TotalSeg mL")
    body = [(r.case, r.task, r.organ, "n/a" if r.dice is None else f"{r.dice:.3f}", f"{r.volume_ml:.1f}",
             f"{r.reference_volume_ml:.1f}") for r in rows]
    widths = [max(len(line[i]) for line in (head, *body)) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip()
             for line in (head, *body)]
    return "\n".join(["agreement with TotalSegmentator's label map of the same scan (Dice; a prediction of "
                      "another model, not ground truth):", *lines])


def evaluate(predictions: str, labels=None, *, task=None, model=None, out: str = "uniseg-evaluation",
             dice_empty: str = "exclude", hd95: bool = True, nsd: bool = True, nsd_tolerance: float = 2.0,
             overwrite: bool = False, progress: bool = True, json: bool = False) -> None:
    """Score label maps against reference labels: Dice, HD95 and normalised surface Dice per case and label.

    Writes the report the bundle's evaluate.json writes: report.json, report.csv (per case and label),
    report_summary.csv (mean, standard deviation per label) and report_boxplot.png; prints the summary table.

    Args:
        predictions: a folder of label maps (<case>.nii.gz or <case>_<task>.nii.gz, as predict writes them), or a
            datalist JSON of {"pred": ..., "label": ...} items (then no LABELS).
        labels: the folder of reference label maps (<case>.nii.gz), on the predictions' grid.
        task: the task whose label names the report uses, or all (the merged all-tasks labels); default: the task
            in the predictions' names.
        model: the model whose tasks name the labels (a folder, Hub repository or model name; needed for tasks
            added with add-task); default the official eleven tasks.
        out: the report folder.
        dice_empty: a label absent from both prediction and reference: exclude (official downstream rule: left out
            of the means), one (counts 1.0, UniSeg's upstream evaluation) or monai (MONAI's DiceMetric default).
        hd95: compute the 95th-percentile Hausdorff distance (mm).
        nsd: compute the normalised surface Dice.
        nsd_tolerance: the surface Dice tolerance in mm.
        overwrite: replace an existing report in --out.
        progress: show a progress bar over the cases.
        json: print the report as JSON.
    """
    from .app.evaluate import evaluate as run
    from .app.predict import quiet
    from .training.evaluation import DICE_EMPTY

    if dice_empty not in DICE_EMPTY:
        usage_error("evaluate", f"--dice-empty must be one of {', '.join(DICE_EMPTY)}, got {dice_empty!r}")
    quiet()
    report = run(predictions, labels, task=task, out_dir=out, dice_empty=dice_empty, hd95=hd95, nsd=nsd,
                 nsd_tolerance=nsd_tolerance, overwrite=overwrite, progress=progress, model=model)
    emit(report, json, _report_table(report))


def _report_table(report) -> str:
    """The evaluation summary as an aligned table: per label, each metric's mean +- standard deviation (n)."""
    def cell(stats, digits):
        if stats["mean"] is None:
            return "n/a"
        return f"{stats['mean']:.{digits}f} +- {stats['std']:.{digits}f} ({stats['n']})"

    head = ("label", "Dice", "HD95 mm", "NSD")
    body = [(f"{s['label']} {name}", cell(s["dice"], 3), cell(s["hd95"], 2), cell(s["nsd"], 3))
            for name, s in report["labels"].items()]
    means = report["mean"]
    body.append(("mean over labels", *("n/a" if means[m] is None else f"{means[m]:.{d}f}"
                                       for m, d in (("dice", 3), ("hd95", 2), ("nsd", 3)))))
    widths = [max(len(row[i]) for row in (head, *body)) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in (head, *body)]
    title = (f"{report['task'] or 'evaluation'}: {report['cases']} case(s), Dice rule "
             f"{report['settings'].get('dice_empty')}")
    return "\n".join([title, *lines, *(f"  {k}: {v}" for k, v in report["files"].items())])


def export(src: str, out: str, *, in_channels: int = 1, json: bool = False) -> None:
    """Export a converted model to ONNX (checked against PyTorch with onnxruntime).

    The graph takes `image` (B, C, x, y, z) and `task` (B,) int64 and returns the logits; TorchScript is not
    offered (see the bundle's docs/README.md).

    Args:
        src: a folder written by `uniseg-hub convert`.
        out: the .onnx file to write.
        in_channels: input channels (1, 2 or 4): the stem baked into the graph.
        json: print the result as JSON.
    """
    from .app.export import export_onnx

    path = export_onnx(src, out, in_channels=in_channels)
    emit({"onnx": str(path), "size": path.stat().st_size}, json, f"exported {src} -> {path}")


def prepare_dataset(dataset: str, raw_dir: str, out_dir: str, *, overwrite: bool = False, json: bool = False) -> None:
    """Turn a public downstream dataset folder (btcv or vs) into the bundle's datalist with the official split.

    Users bring the data; nothing is downloaded or copied. BTCV: 21 training / 9 validation cases; VS: 193 / 49.

    Args:
        dataset: btcv or vs.
        raw_dir: the dataset as downloaded (BTCV RawData or nnU-Net Task060; VS_Seg vs_gk_N folders or Task061).
        out_dir: where datalist.json goes (paths in it are relative to it).
        overwrite: replace an existing datalist.json.
        json: print the result as JSON.
    """
    from .app.prepare import prepare

    result = prepare(dataset, raw_dir, out_dir, overwrite=overwrite)
    emit(result, json, f"wrote {result['datalist']}: {result['training']} training / {result['validation']} "
                       f"validation cases ({result['layout']} layout), target spacing "
                       f"{result['properties']['target_spacing']} mm")


def add_task(model: str, *, name: str, datalist: str, out: str, labels=None, modality=None, channels=None,
             spacing=None, normalization=None, mode: str = "frozen", epochs: int = None, iterations: int = None,
             batch_size: int = None, init_from=None, check=None, title=None, device=None, workers: int = None,
             resume: bool = False, overwrite: bool = False, progress: bool = True, json: bool = False) -> None:
    """Add your own task to the universal model as a new prompt, keeping the original tasks' results.

    Trains with the bundle's train.json + add_task.json (official Dice + CE loss with deep supervision, nnU-Net
    augmentation) on the datalist's training cases and writes the grown model to OUT (model.safetensors and
    config.json with the extended task table), which load_model, predict --model OUT --task NAME and publish take.

    Args:
        model: the universal model to grow: a manifest name (uniseg-11task) or a folder.
        name: the new task's name (lower-case letters, digits, _), e.g. knee_cartilage.
        datalist: a JSON datalist with a 'training' list of {"image", "label"} (the format `uniseg-hub prepare`
            writes); its 'validation' cases, if any, score the new task before and after.
        out: the folder for the grown model; the run (checkpoints, logs) goes to OUT/training.
        labels: the foreground label names, comma-separated (label value 1 first); default: the datalist's labels.
        modality: the task's modality group: CT, MR or PET-CT; default: from the channels.
        channels: the input channel names, comma-separated (CT, T2, ...); default: the datalist's modality.
        spacing: the training voxel spacing x,y,z in mm; default: the datalist's target spacing.
        normalization: ct_window (CT) or zscore (MR, PET); default: from the first channel.
        mode: frozen (only the new task's prompt channel, adapters and heads train: the original tasks' logits stay
            bit-identical) or finetune (also the decoder's upsampling and conv blocks: better for the new task, the
            old tasks move; see --check).
        epochs: training epochs (default: train.json's 100).
        iterations: iterations per epoch (default: train.json's 250).
        batch_size: patches per iteration (default 2).
        init_from: the task the new one starts as (default: the first task of its group with as many channels).
        check: a datalist whose 'validation' cases name their 'task': each task's Dice before and after is reported.
        title: a description of the task for the model card.
        device: cpu, cuda or cuda:N (default: cuda if available).
        workers: data-loading processes (default 4).
        resume: continue the run in OUT/training.
        overwrite: replace a model or a run already in OUT.
        progress: show a progress bar.
        json: print the report as JSON.
    """
    from .app.add_task import add_task as run
    from .training.add_task import MODES

    if str(mode).lower() not in MODES:
        usage_error("add-task", f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    report = run(model, name, datalist, out, labels=labels, modality=modality, channels=channels, spacing=spacing,
                 normalization=normalization, mode=mode, epochs=epochs, iterations=iterations,
                 batch_size=batch_size, init_from=init_from, check=check, title=title, device=device,
                 workers=workers, resume=resume, overwrite=overwrite, progress=progress)
    emit(report, json, _add_task_table(report))


def _add_task_table(report) -> str:
    task, loss = report["task"], report["loss"]
    lines = [f"added task {task['name']} (id {task['id']}, labels {', '.join(task['labels'])}) -> {report['model']}",
             f"mode {report['mode']}, started from {report['init_from']}, {report['iterations']} iterations, "
             f"{report['trained_parameters']:,} trained parameters",
             "loss (first -> last epoch): " + " -> ".join("n/a" if v is None else f"{v:.4f}"
                                                          for v in (loss["first_epoch"], loss["last_epoch"]))]
    if report.get("dice"):
        lines.append(f"{'task':<20} {'cases':>5} {'Dice before':>12} {'after':>8} {'change':>8}")
        for name, d in report["dice"].items():
            before = "n/a" if d["before"] is None else f"{d['before']:.4f}"
            change = "n/a" if d["change"] is None else f"{d['change']:+.4f}"
            lines.append(f"{name:<20} {d['cases']:>5} {before:>12} {d['after']:>8.4f} {change:>8}")
    return "\n".join(lines)


COMMANDS = {"list": list_models, "info": info, "download": download, "verify": verify, "path": path,
            "convert": convert, "publish": publish, "predict": predict, "demo": demo, "export": export,
            "prepare": prepare_dataset, "evaluate": evaluate, "add-task": add_task}


BOOLEANS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False, "1": True, "0": False}
"""What a switch's value may be (``--tta no``, ``--tta=false``); anything else is a usage error."""

LEVEL_SWITCHES = {"predict": {"tta": ("8", "4", "2", "1")}}
"""Options that take a level and are also switches (issue 17: ``--tta 4``; ``--tta``, ``--notta``, ``--tta false``
as before): bare is true, ``--no`` is false; the next argument is taken only when it is a level or a switch value.
The value goes on as given (``config.parse_tta`` reads ``1`` as one flip, not as on)."""


def usage_error(command: str, message: str) -> None:
    print(f"error: {message} (see `uniseg-hub {command} --help`)", file=sys.stderr)
    raise SystemExit(2)


def guard_args(command: str, args: list[str]) -> list[str]:
    """Make fire's argument parsing safe for one command, before anything runs.

    Values are passed as quoted strings (fire would evaluate ``1e5`` or ``0x10`` as numbers) unless the option is
    annotated ``int`` or ``float``; boolean flags (options with a bool default) never swallow the next argument;
    ``-r`` style short flags resolve to their option; unknown options or extra positional arguments are usage
    errors (fire would report them only after running the command). A command that takes ``*args`` or ``**kwargs``
    receives extra arguments or options as typed.
    """
    params = inspect.signature(COMMANDS[command]).parameters
    flags = {n for n, p in params.items() if isinstance(p.default, bool)}
    levels = {n: v for n, v in LEVEL_SWITCHES.get(command, {}).items() if n in params}
    positional = [n for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    any_args = any(p.kind is p.VAR_POSITIONAL for p in params.values())
    any_options = any(p.kind is p.VAR_KEYWORD for p in params.values())
    out, given, values = [], set(), []
    i = 0
    while i < len(args):
        token, i = args[i], i + 1
        if not token.startswith("-") or token == "-":
            values.append(token)
            out.append(repr(token))
            continue
        option, has_value, value = token.lstrip("-").partition("=")
        key = option.replace("-", "_")
        if len(key) == 1 and len(short := [n for n in params if n.startswith(key)]) == 1:
            key = short[0]
        if key.startswith("no") and (key[2:] in flags or key[2:] in levels) and not has_value:
            key, has_value, value = key[2:], True, "False"
        if key in given and key in params:
            usage_error(command, f"option --{key.replace('_', '-')} is given more than once; give it once")
        if key in levels:
            given.add(key)
            if not has_value and i < len(args) and (args[i].lower() in BOOLEANS or args[i] in levels[key]):
                value, has_value, i = args[i], True, i + 1
            out.append(f"--{key}={value if has_value else 'True'!r}")
            continue
        if key not in params:
            if not any_options:
                usage_error(command, f"unknown option {token.split('=')[0]} for `uniseg-hub {command}`; options: "
                                     + ", ".join("--" + n.replace("_", "-") for n, p in params.items()
                                                 if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)))
            out.append(token)
            if not has_value and i < len(args) and not args[i].startswith("-"):
                out.append(args[i])
                i += 1
            continue
        given.add(key)
        if key in flags:
            if not has_value and i < len(args) and args[i].lower() in BOOLEANS:
                value, has_value, i = args[i], True, i + 1
            if has_value and value.lower() not in BOOLEANS:
                usage_error(command, f"--{key.replace('_', '-')} is a switch: give --{key.replace('_', '-')} or "
                                     f"--no{key.replace('_', '-')} (or true/false), got {value!r}")
            out.append(f"--{key}={BOOLEANS[value.lower()] if has_value else True}")
            continue
        if not has_value:
            if i >= len(args):
                usage_error(command, f"option {token} needs a value")
            value, i = args[i], i + 1
        kind = params[key].annotation
        kind = {"int": int, "float": float}.get(kind, kind)
        if kind in (int, float):  # fire parses these: only a number of that kind may reach it
            try:
                kind(value)
            except ValueError:
                usage_error(command, f"--{key.replace('_', '-')} takes {'an integer' if kind is int else 'a number'}"
                                     f", got {value!r}")
        out.append(f"--{key}={value}" if kind in (int, float) else f"--{key}={value!r}")
    free = [n for n in positional if n not in given]
    if len(values) > len(free) and not any_args:
        usage_error(command, f"unexpected argument(s) {' '.join(values[len(free):])} for `uniseg-hub {command}`")
    missing = [n.upper() for n in free[len(values):] if params[n].default is params[n].empty]
    missing += [f"--{n.replace('_', '-')}" for n, p in params.items()
                if p.kind is p.KEYWORD_ONLY and p.default is p.empty and n not in given]
    if missing:
        usage_error(command, f"`uniseg-hub {command}` needs {' '.join(missing)}")
    return out


class _WarningLines(logging.Handler):
    """The library logs what a person should know (missing cases, an adapted stem, an unpinned file); the command
    line shows each warning as one ``warning: ...`` line on stderr (looked up when written, so redirection works),
    and each record marked ``extra={"note": True}`` (the run's expected duration) as one ``note: ...`` line."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            print(f"warning: {' '.join(record.getMessage().split())}", file=sys.stderr)
        elif getattr(record, "note", False):
            print(f"note: {' '.join(record.getMessage().split())}", file=sys.stderr)


def _interrupt(signum, frame) -> None:
    raise Interrupted(signum)


def _root_cause(error: BaseException) -> BaseException:
    """The innermost error of a chain of wrappers (MONAI re-raises a failure as ``RuntimeError`` from it)."""
    seen = {id(error)}
    while error.__cause__ is not None and id(error.__cause__) not in seen:
        error = error.__cause__
        seen.add(id(error))
    return error


def _interruption(error: BaseException) -> Interrupted | None:
    """The ``Interrupted`` inside ``error``, if a library wrapped the signal in an error of its own: pydoc's import,
    which MONAI's config parser uses, catches everything (``BaseException``) and raises ``ErrorDuringImport``
    holding it as ``value``."""
    pending, seen = [error], set()
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        if isinstance(error, Interrupted):
            return error
        seen.add(id(error))
        value = getattr(error, "value", None)
        pending += [error.__cause__, error.__context__, value if isinstance(value, BaseException) else None]
    return None


def _interrupted(signalled: Interrupted) -> None:
    print("interrupted" if signalled.signum == signal.SIGINT else "terminated", file=sys.stderr)
    raise SystemExit(128 + signalled.signum) from None


def _fail(message: str, code: int = 1) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(code) from None


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``uniseg-hub`` console script (returns None: see fire's exit-code pitfall).

    ``--version`` (``-V``) prints ``uniseg-hub VERSION`` on stdout. Help goes to stdout (exit 0); no command is a
    usage error (exit 2). While a command runs, ``sys.stdout`` is
    stderr: only ``emit`` writes to the real stdout, so logs and tracebacks of MONAI, ignite or any library never
    mix with a table or ``--json``. Every failure is one line on stderr: 1 for what the user can fix (and, for
    anything unexpected, the error named as a bug; ``UNISEG_HUB_TRACEBACK=1`` shows its traceback), 2 for usage,
    130 for Ctrl-C, 143 for SIGTERM, 141 when the reader of stdout went away (``| head -1``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("--version", "-V"):
        from . import __version__

        print(f"uniseg-hub {__version__}")
        return
    command = argv[0] if argv else None
    if not argv:
        print("error: no command given; usage: uniseg-hub COMMAND [ARGS] [--OPTIONS], where COMMAND is one of "
              f"{', '.join(COMMANDS)} (see `uniseg-hub --help`)", file=sys.stderr)
        raise SystemExit(2)
    helping = any(a in ("-h", "--help") for a in argv)
    if command not in COMMANDS and not (helping and command in ("-h", "--help")):
        print(f"error: unknown command {command!r}; commands: {', '.join(COMMANDS)} (see `uniseg-hub --help`)",
              file=sys.stderr)
        raise SystemExit(2)
    if helping:
        # show help without running anything (fire runs a command before honouring a trailing --help)
        argv = ([command] if command in COMMANDS else []) + ["--", "--help"]
    elif command in COMMANDS:
        argv = [command, *guard_args(command, argv[1:])]
    warnings_handler = _WarningLines(logging.INFO)
    package_logger = logging.getLogger("uniseg_hub")
    package_logger.addHandler(warnings_handler)
    logging.getLogger("uniseg_hub.pipeline.sliding_window").setLevel(logging.INFO)  # its duration note
    stdout = sys.stdout
    _STDOUT.append(stdout)
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, _interrupt) for s in signals} if _main_thread() else {}
    try:
        with contextlib.redirect_stderr(stdout) if helping else contextlib.redirect_stdout(sys.stderr):
            fire.Fire(COMMANDS, command=argv, name="uniseg-hub")
        if helping:
            stdout.flush()
    except BrokenPipeError:
        # the reader of stdout is gone: nothing more can be shown; Python must not complain at exit either
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), stdout.fileno())
        raise SystemExit(141) from None
    except UnisegHubError as e:
        _fail(str(e))
    except OSError as e:
        _fail(os_error_text(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Interrupted as e:
        _interrupted(e)
    except Exception as e:  # a bug: one line that says so, the traceback on request
        if (signalled := _interruption(e)) is not None:
            _interrupted(signalled)
        if os.environ.get("UNISEG_HUB_TRACEBACK"):
            raise
        root = _root_cause(e)
        _fail(f"unexpected {type(root).__name__}: {root} (a bug in uniseg-hub or a library it uses; please report "
              "it with the command you ran; UNISEG_HUB_TRACEBACK=1 shows the traceback)")
    finally:
        _STDOUT.remove(stdout)
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        package_logger.removeHandler(warnings_handler)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
