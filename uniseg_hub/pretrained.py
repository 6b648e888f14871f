"""Pretrained models: build the network a checkpoint describes and load it strictly, with the paper's transfers.

* ``load_model(src)``: the model as saved (the universal model, or a fine-tuned backbone), in eval mode;
* ``load_model(src, num_classes=N)``: the downstream backbone with the paper's transfer from the universal model
  (97 of the 115 official tensors: prompt, fusion and heads dropped, the prompt channel of the first transposed
  conv removed; fresh N-class heads);
* ``load_encoder(src, in_channels=C)``: the six-stage encoder with one stem for C channels (native for 1, 2, 4;
  adapted from the nearest native stem otherwise).

``src`` is a model name from the manifest (weights downloaded from the Hugging Face Hub and sha256-checked by
``uniseg_hub.hub``, or the original checkpoint fetched, verified and converted once by ``uniseg_hub.upstream``) or
a local checkpoint: a folder written by ``uniseg-hub convert`` or a ``.safetensors`` file beside its
``config.json``, or a Hub repository written by ``uniseg-hub publish`` or ``push_to_hub`` (``ORG/NAME``,
``ORG/NAME@REVISION``). An existing file or folder wins over a manifest name of the same spelling, as in
``transformers`` and ``timm``.

The models ``load_model`` returns are ``UniSeg`` and ``UniSegBackbone`` of this module: the plain networks of
``uniseg_hub.networks`` with the Hugging Face Hub's model-class convention (huggingface_hub's
``PyTorchModelHubMixin``): ``UniSeg.from_pretrained(src)`` is ``load_model`` for that class, ``save_pretrained``
writes a folder that ``load_model`` reads (our ``config.json``, never the mixin's), ``push_to_hub`` uploads it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from . import hub, networks
from .config import UniSegConfig, parse_precision
from .errors import (
    ChecksumError,
    ConfigError,
    IncompatibleCheckpointError,
    UnisegHubError,
    UnknownModelError,
)
from .files import sha256_file
from .networks import UniSegEncoder
from .tasks import TaskTable
from .transfer import check_in_channels, to_backbone, to_encoder
from .upstream import download
from .weights import (
    ARCHITECTURES,
    PRECISION_DTYPES,
    WEIGHTS_FILE,
    LoadReport,
    build_network,
    check_tensors,
    load_checked,
    read_folder,
    read_safetensors,
    save_folder,
    task_table,
)

logger = logging.getLogger(__name__)


def resolve(src, *, pretrained: bool = True, revision=None, cache_dir=None, local_files_only: bool = False,
            force_download: bool = False, token=None, weights_path=None,
            manifest=None) -> tuple[UniSegConfig, dict, dict | None, str]:
    """What ``src`` names, read once: (architecture, pretrained_cfg, state dict or None when not ``pretrained``,
    a label for messages). ``pretrained_cfg`` is the manifest entry or the folder's config.json.
    ``force_download`` and ``token`` apply to downloads only (as in huggingface_hub).

    ``src``, in this order: an existing file or folder (it wins over a manifest name, as in ``transformers`` and
    ``timm``); a manifest name; a Hub repository ``ORG/NAME`` or ``ORG/NAME@REVISION`` (``hub.download_repo``);
    else a local path that does not exist (the error says so).
    """
    if not isinstance(src, (str, os.PathLike)):
        raise UnisegHubError(f"expected a model name, a Hub repository id or a path, got {type(src).__name__} "
                             f"{src!r}")
    m = None if isinstance(src, os.PathLike) or os.path.exists(src) else hub.load_manifest(manifest)
    repo = None if m is None or src in m.models else hub.parse_repo_id(src)
    if m is None or (src not in m.models and repo is None):
        if revision is not None or weights_path is not None:
            raise UnisegHubError(f"revision and weights_path apply to manifest names and Hub repositories, not to the "
                                 f"local checkpoint {src}")
        if m is not None and os.sep not in src and "/" not in src and not src.endswith(".safetensors"):
            raise UnknownModelError(f"unknown model {src!r}: the manifest {m.path} lists: {', '.join(m.models)}; "
                                    "no file or folder of that name exists and it is no Hub repository id "
                                    "(ORG/NAME); see `uniseg-hub list`")
        checkpoint = read_folder(src, tensors=pretrained)
        return checkpoint.config, checkpoint.document, checkpoint.state if pretrained else None, str(src)
    if repo is not None:
        repo_id, pinned = repo
        if pinned is not None and revision is not None and pinned != revision:
            raise UnisegHubError(f"{src} names revision {pinned} but revision={revision!r} was passed; give one")
        folder = hub.download_repo(repo_id, pinned or revision, cache_dir=cache_dir,
                                   local_files_only=local_files_only, weights=pretrained, force=force_download,
                                   token=token)
        checkpoint = read_folder(folder, tensors=pretrained)
        info = {**checkpoint.document, "repo_id": repo_id, "revision": folder.name,
                "weights": str(folder / WEIGHTS_FILE)}
        return checkpoint.config, info, checkpoint.state if pretrained else None, f"{src} ({folder})"
    entry = m.entry(src)
    config = entry.architecture
    data = entry.to_dict()
    info = {**{k: v for k, v in data.items() if k != "architecture"}, **data["architecture"]}
    if not pretrained:
        return config, info, None, src
    if weights_path is not None:
        file = Path(weights_path).expanduser()
        if not file.is_file():
            raise UnisegHubError(f"weights_path {file} is not a file; pass the {entry.filename} of {src}")
        if entry.sha256 is None:
            logger.warning("%s: the manifest has no sha256 for this model (not published), so %s is not checked",
                           src, file)
        elif (digest := sha256_file(file)) != entry.sha256:
            raise ChecksumError(f"weights_path {file} has sha256 {digest}, but the manifest's {src} has "
                                f"{entry.sha256}: it is another checkpoint; load it by its folder instead",
                                path=file, expected=entry.sha256, actual=digest)
    else:
        file = download(src, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                        force=force_download, manifest=m, token=token)
    state = read_safetensors(file)[1]
    check_tensors(state, f"{src} ({file})", config)
    return config, {**info, "weights": str(file)}, state, f"{src} ({file})"


def model_tasks(src: str | os.PathLike, **options) -> TaskTable:
    """The task table of the universal model ``src`` names (its ``config.json``'s ``tasks``, the official eleven by
    default), read without building the network or fetching its weights: what the bundle's ``inference.json``
    resolves ``--task`` against before the model loads. ``options``: ``resolve``'s (revision, cache_dir...)."""
    config, info, _, label = resolve(src, pretrained=False, **options)
    table = task_table(info, config, label)
    if table is None:
        what = ("a fine-tuned downstream backbone, which has no tasks" if config.architecture == "UniSegBackbone"
                else f"a universal model with {config.total_tasks} tasks and no task table in its config.json")
        raise IncompatibleCheckpointError(f"{label} holds {what}; segment with a universal model (e.g. "
                                          "uniseg-11task) or a folder written by `uniseg-hub add-task`")
    return table


def checkpoint_info(src: str | os.PathLike, **options) -> dict:
    """What ``uniseg-hub info`` shows of a model outside the manifest (a folder, a Hub repository): its
    ``config.json`` with ``tasks``, the task table in that file's form (the official eleven included; None for a
    backbone). ``options``: ``resolve``'s."""
    config, info, _, label = resolve(src, pretrained=False, **options)
    table = task_table(info, config, label)
    return {**info, "tasks": None if table is None else table.to_json()}


def _random(model: nn.Module) -> LoadReport:
    """The report of a model built without weights: every tensor keeps its fresh initialisation."""
    return LoadReport(initialised=list(model.state_dict()))


def _finish(model: nn.Module, report: LoadReport, info: Mapping, device) -> nn.Module:
    model.load_report = report
    model.pretrained_cfg = dict(info)
    logger.info("%s: %s", type(model).__name__, report.summary())
    return model.to(device).eval()


def _network_class(network: type[nn.Module] | None, architecture: str, num_classes: int | None,
                   label: str) -> type[nn.Module]:
    """The class ``load_model`` builds for ``architecture``: ``network`` if it is one, by default the Hub-aware one;
    ``IncompatibleCheckpointError`` when ``network`` is the other architecture."""
    if network is None:
        return HUB_ARCHITECTURES[architecture]
    if issubclass(network, ARCHITECTURES[architecture]):
        return network
    if num_classes is not None:
        raise IncompatibleCheckpointError(
            f"num_classes={num_classes} builds the paper's downstream UniSegBackbone, not a {network.__name__}: "
            f"use UniSegBackbone.from_pretrained or load_model with num_classes")
    transfer = ("; UniSegBackbone.from_pretrained(..., num_classes=N) builds the paper's downstream backbone from "
                "it" if architecture == "UniSeg" else "")
    raise IncompatibleCheckpointError(f"{label} holds a {architecture}, not a {network.__name__}: load it with "
                                      f"{architecture}.from_pretrained or load_model{transfer}")


def load_model(src: str | os.PathLike, *, num_classes: int | None = None, pretrained: bool = True,
               revision: str | None = None, cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
               force_download: bool = False, token: str | bool | None = None,
               weights_path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
               deep_supervision: bool = True, manifest=None, network: type[nn.Module] | None = None,
               dtype: str | torch.dtype | None = None) -> nn.Module:
    """The network ``src`` describes in eval mode, or the downstream backbone for ``num_classes`` classes.

    Args:
        src: a manifest name (``list_models()``), a local checkpoint folder / ``.safetensors`` file, or a Hub
            repository ``ORG/NAME[@REVISION]``.
        num_classes: build the downstream backbone with fresh ``num_classes``-class heads (the paper's transfer,
            ``uniseg_hub.transfer.to_backbone``).
        pretrained: False builds the architecture with random weights and downloads no weights.
        revision, cache_dir, local_files_only: passed to ``uniseg_hub.download`` for manifest names and to
            huggingface_hub for Hub repositories.
        force_download, token: download again even if cached; the Hub token (default ``HF_TOKEN`` or the one
            ``hf auth login`` stored), as huggingface_hub takes them.
        weights_path: a local copy of the manifest model's file (checked against its sha256), for machines that
            receive files out of band.
        device: where the model goes.
        deep_supervision: return all decoder levels in training mode.
        manifest: another manifest than ``UNISEG_HUB_MANIFEST`` or the shipped one.
        network: the class to build: ``UniSeg`` / ``UniSegBackbone`` of this module (the default) or a subclass of
            the plain network (``from_pretrained`` passes its own class). A checkpoint that gives the other
            architecture raises ``IncompatibleCheckpointError``.
        dtype: the parameters' dtype: ``None`` / ``fp32`` / ``torch.float32`` (the default, the official weights'
            dtype), ``bf16`` / ``torch.bfloat16`` or ``fp16`` / ``torch.float16`` (weights cast once; a predictor
            feeds such a model input of its dtype). For mixed precision keep float32 weights and use a predictor's
            ``precision`` (autocast), as the official inference does on CUDA.

    The model is a ``UniSeg`` or ``UniSegBackbone`` with ``from_pretrained``, ``save_pretrained`` and
    ``push_to_hub``. It has ``config`` (its ``UniSegConfig``), ``load_report`` (tensors loaded, adapted, skipped,
    initialised) and ``pretrained_cfg`` (the manifest entry or the folder's config.json: architecture,
    preprocessing, license, source).
    """
    weights_dtype = _weights_dtype(dtype)
    if weights_dtype is not None:
        model = load_model(src, num_classes=num_classes, pretrained=pretrained, revision=revision, cache_dir=cache_dir,
                           local_files_only=local_files_only, force_download=force_download, token=token,
                           weights_path=weights_path, device=device, deep_supervision=deep_supervision,
                           manifest=manifest, network=network)
        return model.to(weights_dtype)
    config, info, state, label = resolve(src, pretrained=pretrained, revision=revision, cache_dir=cache_dir,
                                         local_files_only=local_files_only, force_download=force_download,
                                         token=token, weights_path=weights_path, manifest=manifest)
    network = _network_class(network, config.architecture if num_classes is None else "UniSegBackbone",
                             num_classes, label)
    if num_classes is None or (config.architecture == "UniSegBackbone" and config.num_classes == num_classes):
        # uninitialised: a strict load overwrites every tensor
        model = build_network(config, uninitialised=state is not None, network=network,
                              tasks=task_table(info, config, label))
        model.decoder.deep_supervision = deep_supervision
        report = _random(model) if state is None else load_checked(model, state, source=label, assign=True)
        return _finish(model, report, info, device)
    backbone_info = {**info, **config.backbone(num_classes).to_dict()}
    if state is None:
        model = build_network(config.backbone(num_classes), network=network)
        model.decoder.deep_supervision = deep_supervision
        return _finish(model, _random(model), backbone_info, device)
    model, report = to_backbone(state, config, num_classes, deep_supervision=deep_supervision, source=label,
                                backbone=network)
    return _finish(model, report, backbone_info, device)


def _weights_dtype(dtype) -> torch.dtype | None:
    """``load_model``'s ``dtype`` as a torch dtype, None for float32 (nothing to cast); a ``ConfigError`` else."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in PRECISION_DTYPES.values():
            raise ConfigError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
        dtype = str(dtype)  # "torch.bfloat16": parse_precision reads the dtype's name
    try:
        precision = parse_precision(dtype)
    except ConfigError:
        precision = None
    if precision in (None, "auto"):
        raise ConfigError(f"dtype must be fp32, bf16 or fp16 (or the torch dtype), got {dtype!r}; for mixed "
                          "precision keep float32 weights and give the predictor a precision")
    return None if precision == "fp32" else PRECISION_DTYPES[precision]


def load_encoder(src: str | os.PathLike, *, in_channels: int = 1, pretrained: bool = True,
                 out_indices: Sequence[int] | None = None, revision: str | None = None,
                 cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                 force_download: bool = False, token: str | bool | None = None,
                 weights_path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 manifest=None) -> UniSegEncoder:
    """The pretrained six-stage encoder of ``src`` with a stem for ``in_channels``, in eval mode.

    ``src`` and the other options are as for ``load_model``. The encoder has ``feature_info`` (channels,
    reductions), ``load_report`` (stems taken or adapted, tensors skipped) and ``pretrained_cfg`` (preprocessing,
    license, source). ``pretrained=False`` builds the same encoder with random weights without downloading.
    Its feature maps are contiguous tensors in PyTorch's default layout.
    """
    check_in_channels(in_channels)
    config, info, state, label = resolve(src, pretrained=pretrained, revision=revision, cache_dir=cache_dir,
                                         local_files_only=local_files_only, force_download=force_download,
                                         token=token, weights_path=weights_path, manifest=manifest)
    if state is None:
        encoder = UniSegEncoder((in_channels,), config.features, config.kernel_sizes, config.strides,
                                out_indices=out_indices)
        return _finish(encoder, _random(encoder), info, device)
    encoder, report = to_encoder(state, config, in_channels, out_indices=out_indices, source=label)
    return _finish(encoder, report, info, device)


MODEL_CARD = """
---
{{ card_data }}
---

A UniSeg network ({{ paper_url }}) saved by uniseg-hub (`save_pretrained`, `push_to_hub`): `config.json` is its
architecture, `model.safetensors` its weights in MONAI axis order (C, x, y, z). With `pip install uniseg-hub`:

```python
import uniseg_hub
model = uniseg_hub.load_model("ORG/NAME")  # this repository's id; or uniseg_hub.UniSeg.from_pretrained("ORG/NAME")
```

Licence: weights initialised from the official UniSeg checkpoint fall under the official code's non-commercial
terms ({{ repo_url }}).
"""
"""The README.md that ``save_pretrained`` and ``push_to_hub`` write when the folder has none (huggingface_hub's
template syntax: the front matter, ``paper_url`` and ``repo_url`` come from ``UniSegHubMixin``'s class arguments)."""


class UniSegHubMixin(PyTorchModelHubMixin, library_name=hub.LIBRARY_NAME, tags=list(hub.MODEL_TAGS),
                     pipeline_tag=hub.PIPELINE_TAG, license="other", model_card_template=MODEL_CARD,
                     paper_url="https://arxiv.org/abs/2304.03493", repo_url="https://github.com/yeerwen/UniSeg"):
    """huggingface_hub's model-class convention (``PyTorchModelHubMixin``) on uniseg-hub's loading and folders.

    * ``from_pretrained(src, **options)`` is ``load_model(src, network=cls, **options)``: every source and check of
      ``load_model`` (manifest names with their sha256, folders, Hub repositories ``ORG/NAME[@REVISION]``, strict
      loading), never the mixin's own non-strict loading;
    * ``save_pretrained(folder)`` writes ``weights.save_folder``'s folder (``model.safetensors`` with its metadata,
      ``config.json`` with the architecture: the mixin keeps a config.json that ``_save_pretrained`` wrote) and the
      model card ``MODEL_CARD`` as ``README.md`` (library, tags, licence ``other``) unless one is there;
      ``push_to_hub`` uploads that folder in one commit.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *,
                        map_location: str | torch.device | None = None, **options):
        """``pretrained_model_name_or_path`` loaded by ``load_model`` as this class, in eval mode.

        ``options`` are ``load_model``'s: revision, cache_dir, local_files_only, force_download, token (as in
        huggingface_hub), device (``map_location``, huggingface_hub's name for it, also works), deep_supervision,
        pretrained, weights_path, manifest; ``UniSegBackbone.from_pretrained(src, num_classes=N)`` is the paper's
        transfer from the universal model. A checkpoint of the other architecture raises
        ``IncompatibleCheckpointError``.
        """
        if map_location is not None:
            if "device" in options:
                raise TypeError("pass device or map_location (its huggingface_hub name), not both")
            options["device"] = map_location
        return load_model(pretrained_model_name_or_path, network=cls, **options)

    def _save_pretrained(self, save_directory: Path) -> None:
        """The folder ``load_model`` reads; its ``source`` names where the model was first loaded from, if known."""
        loaded = getattr(self, "pretrained_cfg", {}).get("source")
        source = {"initialised_from": loaded.get("initialised_from", loaded)} if loaded else {}
        save_folder(save_directory, self.state_dict(), self.config, source=source, overwrite=True,
                    tasks=getattr(self, "tasks", None))


class UniSeg(networks.UniSeg, UniSegHubMixin):
    """``uniseg_hub.networks.UniSeg`` (arguments, ``forward``: see there) with ``from_pretrained``,
    ``save_pretrained`` and ``push_to_hub`` (``UniSegHubMixin``)."""


class UniSegBackbone(networks.UniSegBackbone, UniSegHubMixin):
    """``uniseg_hub.networks.UniSegBackbone`` (arguments, ``forward``: see there) with ``from_pretrained``,
    ``save_pretrained`` and ``push_to_hub`` (``UniSegHubMixin``)."""


HUB_ARCHITECTURES = {"UniSeg": UniSeg, "UniSegBackbone": UniSegBackbone}
"""The class ``load_model`` builds for each ``UniSegConfig.architecture``."""
