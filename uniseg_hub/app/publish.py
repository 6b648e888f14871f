"""Publishing a converted checkpoint as a Hugging Face Hub repository, and the manifest entry that pins it.

The repository serves two kinds of users at once:

* uniseg-hub (and anyone with ``hf_hub_download``): ``model.safetensors`` and ``config.json`` at the top level,
  described by a model card ``README.md`` whose front matter names the licence (``other``: UniSeg's
  non-commercial terms, linked), the tags and the library;
* MONAI: with a bundle folder (the repository's ``bundle/`` by default), its ``configs/``, ``docs/``, ``scripts/``
  and ``LICENSE`` are copied too and the converted folder appears again as ``models/`` (``model.safetensors``,
  ``config.json``), so that
  ``monai.bundle.download(name=..., source="huggingface_hub", repo=ORG/NAME)`` fetches a runnable bundle (the Hub
  stores the identical file once). ``models/model.pt`` holds the same tensors for ``monai.bundle.load``, which
  reads exactly that file with ``torch.load(weights_only=True)`` (plain tensors, nothing executable; uniseg-hub
  itself never reads it), and ``large_files.yml`` names the three model files with their sha256 and their URLs
  at the version's tag, as in a Model Zoo bundle.

The upload is one commit through ``HfApi.create_commit``; its sha becomes the entry's pinned ``revision``, and the
tag (``v`` + the package version unless chosen) marks it. Tags never move: ``large_files.yml`` points at it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    ModelCardData,
)
from huggingface_hub import errors as hf_errors
from huggingface_hub.utils import validate_repo_id

from .. import __version__, hub
from ..config import ManifestEntry
from ..errors import PublishError, UnisegHubError
from ..files import sha256_file
from ..weights import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    Checkpoint,
    build_network,
    load_checked,
    read_folder,
)
from .bundle import bundle_dir as packaged_bundle_dir

BUNDLE_PARTS = ("configs", "docs", "scripts", "LICENSE")
MONAI_STATE_FILE = "model.pt"
"""The file ``monai.bundle.load`` reads from ``models/`` (with ``torch.load(weights_only=True)``)."""
LARGE_FILES = [f"models/{name}" for name in (WEIGHTS_FILE, CONFIG_FILE, MONAI_STATE_FILE)]
OFFICIAL = "uniseg-11task"


def _check_repo_id(repo_id) -> str:
    repo_id = str(repo_id)
    try:
        validate_repo_id(repo_id)
    except ValueError as e:
        raise PublishError(f"--repo-id {repo_id!r} is not a Hub repository id ({e}); use ORG/NAME") from e
    if repo_id.count("/") != 1:
        raise PublishError(f"--repo-id {repo_id!r} must be ORG/NAME (a user or organisation, then the name)")
    return repo_id


def _bundle_folder(bundle_dir, bundle: bool) -> Path | None:
    if not bundle:
        return None
    if bundle_dir is None:
        return packaged_bundle_dir(required=False)
    folder = Path(bundle_dir).expanduser()
    if not (folder / "configs").is_dir():
        raise PublishError(f"{folder} is not a MONAI bundle folder (it has no configs/); pass the bundle's root, "
                           "or --nobundle to publish the model files only")
    return folder


def _entry(name: str, description, repo_id: str, checkpoint: Checkpoint, weights: Path, source_url,
           manifest) -> ManifestEntry:
    """The manifest entry of the published file (revision still None): what the manifest knows about ``name``
    (or about the official model) updated with the facts of this folder."""
    active = hub.load_manifest(manifest)
    known = name in active.models
    base = active.models[name] if known else hub.packaged_manifest().models[OFFICIAL]
    config = checkpoint.config
    converted_from = checkpoint.document.get("source") or {}
    if known and base.source.get("original_sha256") and converted_from.get("sha256") \
            and base.source["original_sha256"] != converted_from["sha256"]:
        raise PublishError(
            f"the folder was converted from a file with sha256 {converted_from['sha256']}, but the manifest's {name} "
            f"comes from {base.source['original_sha256']}: wrong checkpoint, or choose another --name")
    if known and base.architecture == config:
        preprocessing = base.preprocessing.to_dict()
    elif checkpoint.tasks is not None:  # a universal model: the official rules for each task of its table
        preprocessing = hub.official_preprocessing(config.patch_size, checkpoint.tasks)
    else:
        preprocessing = {"axis_order": "MONAI (C, x, y, z)",
                         "note": "not recorded: a fine-tuned model expects the preprocessing of its own training"}
    if known:
        source = base.source.to_dict()
    else:
        source = {k: base.source[k] for k in ("paper", "paper_url", "code", "code_commit") if k in base.source}
        source["original_url"] = None
    source.update({
        "original_file": converted_from.get("file") or source.get("original_file"),
        "original_format": converted_from.get("format") or source.get("original_format"),
        "original_sha256": converted_from.get("sha256") or source.get("original_sha256"),
        "converted_with": f"uniseg-hub {checkpoint.document.get('uniseg_hub_version', __version__)}",
    })
    if source_url is not None:
        source["original_url"] = str(source_url)
    if description is None:
        description = base.description if known else (
            f"{config.architecture} converted by uniseg-hub from {source['original_file'] or 'a checkpoint'}")
    entry = {
        "name": name, "description": str(description), "published": True, "repo_id": repo_id, "revision": None,
        "sha256": sha256_file(weights), "size": weights.stat().st_size, "filename": WEIGHTS_FILE,
        "format": "safetensors", "license": base.license.to_dict(), "architecture": config.to_dict(),
        "preprocessing": preprocessing, "source": source,
    }
    if checkpoint.tasks is not None and not checkpoint.tasks.official:  # predict reads them before downloading
        entry["tasks"] = checkpoint.tasks.to_json()
    return ManifestEntry.from_dict(entry, "the new manifest entry", require_revision=False)


def model_card(entry: ManifestEntry, with_bundle: bool) -> str:
    """README.md of the repository: YAML front matter for the Hub, then how to use, licence and provenance."""
    license_ = entry.license
    data = ModelCardData(license="other", license_name="uniseg-non-commercial", license_link=license_.url,
                         library_name=hub.LIBRARY_NAME, tags=list(hub.MODEL_TAGS), pipeline_tag=hub.PIPELINE_TAG)
    name, repo_id, source = entry.name, entry.repo_id, entry.source
    bundle = (f"""
## MONAI bundle

This repository is also a MONAI bundle (`configs/`, `docs/`, `LICENSE`, weights in `models/`):

```python
import monai.bundle
where = dict(name="{repo_id.split('/')[1]}", source="huggingface_hub", repo="{repo_id}", bundle_dir="bundles")
monai.bundle.download(**where)                              # the latest version tag
model = monai.bundle.load(**where, workflow_type="inference")  # the universal model with the weights
```

`models/model.pt` holds the same tensors as `model.safetensors` for `monai.bundle.load` (plain tensors, read with
`torch.load(weights_only=True)`); `large_files.yml` lists the model files with their sha256.

See `docs/README.md` for running inference, evaluation and fine-tuning with it.
""" if with_bundle else "")
    original = f", from {source['original_url']}" if source.get("original_url") else ""
    tasks = entry.preprocessing.get("tasks") or {}
    task_rows = "".join(
        f"| `{name}` | {t['id']} | {t['group']} | {', '.join(t['channels'])} | "
        f"{', '.join(v for k, v in t['labels'].items() if k != '0')} | {' x '.join(f'{z:g}' for z in t['spacing'])} |\n"
        for name, t in tasks.items())
    task_table = (f"""
## Tasks

`uniseg-hub predict SCAN --task NAME --model {repo_id}` segments one of these tasks (`--task all`: every task of
the scan's modality).

| task | id | group | channels | labels | spacing (mm) |
|---|---|---|---|---|---|
{task_rows}""" if tasks else "")
    return f"""---
{data.to_yaml()}
---

# {name}

{entry.description}.

The weights are in MONAI axis order, (C, x, y, z), as `{WEIGHTS_FILE}`; `{CONFIG_FILE}` describes the
architecture ({entry.architecture.architecture}). Converted and published with {source['converted_with']}
(`pip install uniseg-hub`), which reads the official nnU-Net v1 checkpoint without executing pickled code.

## Use

```python
# pip install uniseg-hub
from uniseg_hub import load_encoder, load_model

model = load_model("{name}")                    # once the uniseg-hub manifest lists {name}
encoder = load_encoder("{name}", in_channels=1)  # pretrained encoder, sha256-checked download
```

Without a manifest entry, download the folder and load it:

```python
from huggingface_hub import snapshot_download
from uniseg_hub import load_model

model = load_model(snapshot_download("{repo_id}", allow_patterns=["{WEIGHTS_FILE}", "{CONFIG_FILE}"]))
```
{task_table}{bundle}
## Files

| file | bytes | sha256 |
|---|---|---|
| `{WEIGHTS_FILE}` | {entry.size} | `{entry.sha256}` |

## Licence

**Non-commercial use only.** The weights come from UniSeg and fall under
[{license_.name}]({license_.url}); for commercial use, contact the authors
({license_.commercial_contact or 'see the licence'}). {license_.notes or ''}

## Provenance

* Paper: {source['paper']} {source.get('paper_url', '')}
* Official code: {source['code']} at commit `{source['code_commit']}`
* Original checkpoint: `{source.get('original_file')}` (sha256 `{source.get('original_sha256')}`){original}
"""


def _refuse_links(folder: Path, parts) -> None:
    """A ``PublishError`` for any symbolic link among ``parts`` of ``folder`` (at any depth): copying follows
    links, so a link would upload whatever it points to, possibly a file from outside the folder."""
    for part in parts:
        root = folder / part
        for path in [root, *(root.rglob("*") if root.is_dir() and not root.is_symlink() else [])]:
            if path.is_symlink():
                raise PublishError(f"{path} is a symbolic link (to {os.readlink(path)}); publish uploads only "
                                   "regular files from inside the folder: replace the link by the file itself")


def _check_tag(tag) -> str:
    tag = str(tag)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", tag) or re.fullmatch(r"[0-9a-f]{40}", tag) \
            or tag == "main":
        raise PublishError(f"--tag {tag!r} is not a usable tag name; use letters, digits, '.', '_' and '-', such as "
                           f"v{__version__}")
    return tag


def _large_files(out: Path, url: str) -> list[dict]:
    """The ``large_files.yml`` entries of the staged bundle: each model file with its sha256 and its URL under
    ``url`` (the repository's files at the tag)."""
    return [{"path": path, "url": f"{url}/{path}", "hash_val": sha256_file(out / path), "hash_type": "sha256"}
            for path in LARGE_FILES]


def _stage(out: Path, folder: Path, checkpoint: Checkpoint, bundle: Path | None, card: str,
           url: str) -> tuple[list[str], list[dict]]:
    """Lay the repository out in ``out``; returns its files (relative, sorted) and its large files (none without
    a bundle). ``url``: where the files will be, at the tag."""
    _refuse_links(folder, (WEIGHTS_FILE, CONFIG_FILE))
    if bundle is not None:
        _refuse_links(bundle, [part for part in BUNDLE_PARTS if (bundle / part).exists() or
                               (bundle / part).is_symlink()])
        if out.resolve().is_relative_to(bundle.resolve()):
            raise PublishError(f"--out-dir {out} lies inside the bundle folder {bundle}, which would copy the "
                               "repository into itself; choose a folder outside it")
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise PublishError(f"{out} is not empty; give publish an empty or new --out-dir")
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        shutil.copyfile(folder / name, out / name)
    (out / "README.md").write_text(card, encoding="utf-8")
    large_files = []
    if bundle is not None:
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".DS_Store")
        for part in BUNDLE_PARTS:
            if (bundle / part).is_dir():
                shutil.copytree(bundle / part, out / part, ignore=ignore)
            elif (bundle / part).is_file():
                shutil.copyfile(bundle / part, out / part)
        (out / "models").mkdir(exist_ok=True)  # the bundle's configs load the converted folder models/
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            shutil.copyfile(folder / name, out / "models" / name)
        torch.save(checkpoint.state, out / "models" / MONAI_STATE_FILE)
        large_files = _large_files(out, url)
        header = ("# The model files of this bundle, fetched with `python -m monai.bundle download_large_files "
                  "--bundle_path .`\n# (sha256-checked). Written by `uniseg-hub publish`.\n")
        (out / "large_files.yml").write_text(header + yaml.safe_dump({"large_files": large_files}, sort_keys=False),
                                             encoding="utf-8")
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()), large_files


@contextmanager
def _hub_errors(api: HfApi, repo_id: str):
    """The Hub's refusals and network failures during a publish, as one ``PublishError`` that says what to do."""
    try:
        yield
    except PublishError:
        raise
    except hf_errors.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        hint = ("log in with `hf auth login` (a token with write access to the organisation) or set HF_TOKEN"
                if status in (401, 403) else "check the repository id and your access to it")
        raise PublishError(f"the Hub at {api.endpoint} refused to publish {repo_id} (HTTP {status}: "
                           f"{' '.join(str(e).split())}); {hint}") from e
    except ValueError as e:
        raise PublishError(f"the Hub at {api.endpoint} rejected the upload to {repo_id}: {' '.join(str(e).split())}"
                           ) from e
    except (OSError, hf_errors.HTTPError) as e:
        raise PublishError(f"could not reach the Hub at {api.endpoint} to publish {repo_id}: "
                           f"{' '.join(str(e).split())}; check the network, HF_ENDPOINT and the proxy settings") from e


def _upload(api: HfApi, out: Path, files: list[str], repo_id: str, tag: str, *, private: bool, message: str):
    """One commit that makes the repository's main branch hold exactly ``files``, tagged ``tag``; returns the
    CommitInfo. A tag that already exists is refused before anything is uploaded."""
    with _hub_errors(api, repo_id):
        api.create_repo(repo_id, private=private, exist_ok=True)
        taken = {ref.name: ref.target_commit for ref in api.list_repo_refs(repo_id).tags}
        if tag in taken:
            raise PublishError(
                f"{repo_id} already has the tag {tag} (commit {taken[tag]}); a published version never changes, "
                f"so that its large_files.yml hashes stay true: publish with another --tag (such as {tag}-2) or "
                "with a new uniseg-hub version")
        try:
            stale = set(api.list_repo_files(repo_id)) - set(files) - {".gitattributes"}
        except (hf_errors.RevisionNotFoundError, hf_errors.EntryNotFoundError):  # a new, empty repository
            stale = set()
        operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(out / f)) for f in files]
        operations += [CommitOperationDelete(path_in_repo=f) for f in sorted(stale)]
        commit = api.create_commit(repo_id, operations=operations, commit_message=message)
    try:
        api.create_tag(repo_id, tag=tag, revision=commit.oid, tag_message=message)
    except (hf_errors.HfHubHTTPError, OSError) as e:
        raise PublishError(f"{repo_id} now holds commit {commit.oid}, but tagging it {tag} failed "
                           f"({' '.join(str(e).split())}); tag it by hand: `hf repos tag create {repo_id} {tag} "
                           f"--revision {commit.oid}`") from e
    return commit


def publish(folder: str | os.PathLike, repo_id: str, *, name: str | None = None, description: str | None = None,
            source_url: str | None = None, bundle_dir: str | os.PathLike | None = None, bundle: bool = True,
            tag: str | None = None, out_dir: str | os.PathLike | None = None, dry_run: bool = False,
            private: bool = False, token: str | None = None, endpoint: str | None = None, manifest=None) -> dict:
    """Turn a converted folder into a Hub repository; returns what was done and the manifest entry to add.

    Args:
        folder: written by ``uniseg-hub convert`` (``model.safetensors`` + ``config.json``); checked to load.
        repo_id: ``ORG/NAME`` on the Hub (created if needed).
        name: the manifest name (default: NAME of the repo id, lower-cased). An entry of that name in the manifest
            lends its description, preprocessing and provenance (``uniseg-11task`` for the official model).
        description, source_url: the entry's description and ``source.original_url``.
        bundle_dir: the MONAI bundle to include (default: the repository's ``bundle/`` when it exists);
            ``bundle=False`` publishes the model files only.
        tag: the tag that marks the commit (default ``v`` + the package version); refused when the repository
            has it already. The bundle's ``large_files.yml`` points at it.
        out_dir: where to build the repository (default: a temporary folder, kept for a dry run).
        dry_run: build the folder and the entry, upload nothing (the entry's revision stays None).
            Otherwise one commit makes the repository hold exactly these files (others are deleted in it).
        private, token, endpoint: for the upload (``token`` defaults to ``hf auth login`` / ``HF_TOKEN``, the
            endpoint to ``HF_ENDPOINT``).
        manifest: the manifest that lends the entry's details (default as for ``load_model``).

    Returns ``{"repo_id", "folder", "files", "bundle", "tag", "large_files", "commit", "url", "entry"}``;
    ``large_files`` are the bundle's ``large_files.yml`` entries (empty without the bundle), for a copy of the
    bundle elsewhere (the Model Zoo); ``entry`` is the ``ManifestEntry`` to add to the manifest
    (``entry.to_dict()`` is its JSON), pinned to the new commit (``revision`` None after a dry run).
    """
    repo_id = _check_repo_id(repo_id)
    tag = _check_tag(tag if tag is not None else f"v{__version__}")
    name = str(name) if name is not None else repo_id.split("/")[1].lower()
    folder = Path(folder).expanduser()
    if not (folder / WEIGHTS_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
        raise PublishError(f"{folder} is not a converted folder: it needs {WEIGHTS_FILE} and {CONFIG_FILE}, as "
                           "`uniseg-hub convert` writes them")
    checkpoint = read_folder(folder)
    try:
        load_checked(build_network(checkpoint.config), checkpoint.state, source=str(folder))
    except UnisegHubError as e:
        raise PublishError(f"{folder} does not load into the architecture its {CONFIG_FILE} describes: {e}") from e
    bundle_folder = _bundle_folder(bundle_dir, bundle)
    entry = _entry(name, description, repo_id, checkpoint, folder / WEIGHTS_FILE, source_url, manifest)
    api = HfApi(endpoint=endpoint, token=token, library_name=hub.LIBRARY_NAME, library_version=__version__)
    keep = dry_run or out_dir is not None
    out = Path(out_dir).expanduser() if out_dir is not None else Path(tempfile.mkdtemp(prefix="uniseg-hub-publish-"))
    try:
        card = model_card(entry, bundle_folder is not None)
        files, large_files = _stage(out, folder, checkpoint, bundle_folder, card,
                                    f"{api.endpoint}/{repo_id}/resolve/{tag}")
        result = {"repo_id": repo_id, "folder": str(out) if keep else None, "files": files,
                  "bundle": str(bundle_folder) if bundle_folder else None, "tag": tag, "large_files": large_files,
                  "commit": None, "url": None, "entry": entry}
        if dry_run:
            return result
        commit = _upload(api, out, files, repo_id, tag, private=private,
                         message=f"Publish {name} ({entry.sha256[:12]}) with uniseg-hub {__version__}")
    finally:
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
    entry = ManifestEntry.from_dict({**entry.to_dict(), "revision": commit.oid}, "the new manifest entry")
    result.update(commit=commit.oid, url=f"{api.endpoint}/{repo_id}/tree/{commit.oid}", entry=entry)
    return result
