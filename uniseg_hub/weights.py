"""Checkpoints: safe reading of official nnU-Net v1 files, conversion to MONAI form, safetensors folders, strict
loading.

A converted folder holds ``model.safetensors`` (tensors in MONAI axis order, metadata naming the architecture and the
source file's sha256) and ``config.json`` (the same architecture, readable without torch). Official checkpoints are
read with ``torch.load(weights_only=True)`` and an allow-list of the numpy globals nnU-Net's training state needs;
anything else in the pickle is refused, never executed.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import pickle
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .config import CONFIG_FILE, WEIGHTS_FILE, UniSegConfig, total_stride
from .errors import (
    ConfigError,
    IncompatibleCheckpointError,
    UnisegHubError,
    UnsafeCheckpointError,
)
from .files import atomic_path, format_json, sha256_file, write_text_atomic
from .networks import UniSeg, UniSegBackbone
from .tasks import OFFICIAL_TASKS, TaskTable

FORMAT_VERSION = 1
ARCHITECTURES = {"UniSeg": UniSeg, "UniSegBackbone": UniSegBackbone}
"""The network class of each ``UniSegConfig.architecture``."""

# numpy globals that nnU-Net v1's training state (plot_stuff, best_stuff: numpy scalars) needs; both the numpy 1
# (``numpy.core``) and numpy 2 (``numpy._core``) spellings, since the official file was written with numpy 1.
_SCALAR = np._core.multiarray.scalar
_DTYPE_CLASSES = [type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.bool_)]
SAFE_GLOBALS = [_SCALAR, (_SCALAR, "numpy.core.multiarray.scalar"), np.dtype, *_DTYPE_CLASSES]

# official key -> our key, applied after "instnorm" became "adn.N" (MONAI's Convolution names its norm ADN.N)
_KEY_RULES = [
    (r"intermedia_prompt", r"prompt.universal"),
    (r"fusion_layer\.blocks\.(\d+)\.(conv|adn\.N)\.(weight|bias)", r"prompt.fusion.\1.\2.\3"),
    (r"conv_blocks_context\.0\.blocks\.0\.conv_(\d+)\.(weight|bias)", r"encoder.stages.0.0.convs.\1.\2"),
    (r"conv_blocks_context\.0\.blocks\.0\.adn\.N\.(weight|bias)", r"encoder.stages.0.0.norm.\1"),
    (r"conv_blocks_context\.(\d+)\.blocks\.(\d+)\.(conv|adn\.N)\.(weight|bias)", r"encoder.stages.\1.\2.\3.\4"),
    (r"conv_blocks_context\.(\d+)\.(\d+)\.blocks\.0\.(conv|adn\.N)\.(weight|bias)", r"encoder.stages.\1.\2.\3.\4"),
    (r"conv_blocks_localization\.(\d+)\.(\d+)\.blocks\.0\.(conv|adn\.N)\.(weight|bias)",
     r"decoder.blocks.\1.\2.\3.\4"),
    (r"tu\.(\d+)\.weight", r"decoder.upsamples.\1.weight"),
    (r"seg_outputs(?:_down)?\.(\d+)\.weight", r"decoder.heads.\1.weight"),
]


def read_official_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of an official UniSeg/nnU-Net v1 ``.model`` file, read without executing pickled code.

    Raises ``UnsafeCheckpointError`` when the pickle needs any global outside ``SAFE_GLOBALS``.
    """
    path = Path(path)
    if not path.is_file():
        raise UnisegHubError(f"checkpoint {path} does not exist; pass the official .model file")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.findall(r"GLOBAL ([\w.]+)", str(e))
        raise UnsafeCheckpointError(
            f"refused to load {path}: it needs {', '.join(found) or 'objects'} outside the allow-list of a UniSeg "
            "checkpoint, which could run code when unpickled; convert only files from a source you trust, and "
            "report the file if it is the official one"
        ) from e
    except Exception as e:  # a damaged zip or pickle makes torch raise nearly any type
        raise IncompatibleCheckpointError(f"cannot read {path} as a PyTorch checkpoint ({type(e).__name__}: "
                                          f"{str(e)[:200]}); is the file complete? Download it again") from e
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise IncompatibleCheckpointError(f"{path} holds no state_dict of tensors; is it an nnU-Net .model file?")
    check_tensors(state, str(path))
    return {k.removeprefix("module."): v for k, v in state.items()}


DTYPE = torch.float32
"""The dtype of every UniSeg tensor (the official checkpoint's, and what the networks are built with)."""

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The torch dtype of each of ``config.PRECISIONS`` but ``auto``: of weights cast once (``load_model(dtype=...)``)
or of an autocast (``pipeline.predictor.autocast_dtype``)."""


@functools.lru_cache(maxsize=8)
def expected_tensors(config: UniSegConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor of the network ``config`` describes, from a network built on the meta
    device (no memory is allocated)."""
    with torch.device("meta"):
        network = ARCHITECTURES[config.architecture](config=config)
    return {k: (tuple(v.shape), v.dtype) for k, v in network.state_dict().items()}


def check_tensors(state: Mapping, source: str, config: UniSegConfig | None = None) -> None:
    """Refuse a state dict that no UniSeg network should load, naming the tensors and the fix.

    Always: names that are not strings, values that are not tensors, dtypes other than float32, empty (zero-size)
    tensors and tensors holding NaN or infinity. With ``config``: tensors missing, unexpected or misshaped for the
    network it describes (compared before the network is built, so a damaged config.json allocates nothing).
    Raises ``IncompatibleCheckpointError``.
    """
    def fail(problem: str):
        raise IncompatibleCheckpointError(
            f"{source}: {problem}; the file is damaged or not a UniSeg checkpoint: download it again, or convert "
            "the official checkpoint again with `uniseg-hub convert`")

    if not isinstance(state, Mapping):
        fail(f"it holds a {type(state).__name__}, not a mapping of tensor names to tensors")
    names = [k for k in state if not isinstance(k, str)]
    if names:
        fail(f"{len(names)} tensor name(s) are not strings ({_listing(repr(k) for k in names)})")
    values = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if values:
        fail(f"{len(values)} entries are not tensors ({_listing(f'{k} ({type(state[k]).__name__})' for k in values)})")
    dtypes = [f"{k} ({str(v.dtype).removeprefix('torch.')})" for k, v in state.items() if v.dtype != DTYPE]
    if dtypes:
        fail(f"{len(dtypes)} tensor(s) are not float32, the dtype of every UniSeg tensor: {_listing(dtypes)}")
    if config is not None:
        expected = expected_tensors(config)
        problems = []
        if missing := [k for k in expected if k not in state]:
            problems.append(f"missing {len(missing)} tensors: {_listing(missing)}")
        if unexpected := [k for k in state if k not in expected]:
            problems.append(f"unexpected {len(unexpected)} tensors: {_listing(unexpected)}")
        if misshaped := [f"{k} {tuple(v.shape)} != {expected[k][0]}" for k, v in state.items()
                         if k in expected and tuple(v.shape) != expected[k][0]]:
            problems.append(f"{len(misshaped)} tensors with the wrong shape (checkpoint != configuration): "
                            f"{_listing(misshaped)}")
        if problems:
            fail(f"does not fit {config.architecture}: " + "; ".join(problems))
    empty = [f"{k} {tuple(v.shape)}" for k, v in state.items() if v.numel() == 0]
    if empty:
        fail(f"{len(empty)} tensor(s) are empty (a zero-size dimension): {_listing(empty)}")
    nonfinite = [k for k, v in state.items() if not bool(torch.isfinite(v).all())]
    if nonfinite:
        fail(f"{len(nonfinite)} tensor(s) are not finite (NaN or infinite values): {_listing(nonfinite)}")


def official_key(key: str) -> str | None:
    """Our name for an official state-dict key, or None when no rule maps it."""
    key = key.replace(".instnorm.", ".adn.N.")
    for pattern, replacement in _KEY_RULES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def _reverse_axes(t: torch.Tensor) -> torch.Tensor:
    """(z, y, x) -> (x, y, z) on the last three axes of 5-D tensors (conv kernels, the prompt)."""
    return t.permute(0, 1, 4, 3, 2).contiguous() if t.ndim == 5 else t


def _require(state: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise IncompatibleCheckpointError(f"the checkpoint has no tensor {key!r}; it is not a UniSeg checkpoint")
    return state[key]


def infer_architecture(state: Mapping[str, torch.Tensor]) -> UniSegConfig:
    """Architecture of an official state dict, read from tensor shapes.

    Works for any task count, head width, features per stage and stem set; the patch size comes from the prompt.
    Downstream checkpoints (no prompt, heads ``seg_outputs_down``) give a ``UniSegBackbone``.
    """
    stems = sorted(int(m.group(1)) for k in state
                   if (m := re.fullmatch(r"conv_blocks_context\.0\.blocks\.0\.conv_(\d+)\.weight", k)))
    if not stems:
        raise IncompatibleCheckpointError(
            "the checkpoint has no input stems (conv_blocks_context.0.blocks.0.conv_N.weight); "
            "it is not a UniSeg checkpoint"
        )
    stages = [k.split(".")[1] for k in state if k.startswith("conv_blocks_context.")]
    if not all(s.isdigit() and int(s) < 64 for s in stages):
        raise IncompatibleCheckpointError(f"the checkpoint's stage names ({_listing(sorted(set(stages)))}) are not "
                                          "conv_blocks_context.N with a stage number N; it is not a UniSeg checkpoint")
    num_stages = 1 + max(int(s) for s in stages)
    first_convs = [_require(state, f"conv_blocks_context.0.blocks.0.conv_{stems[0]}.weight")]
    for s in range(1, num_stages):
        key = f"conv_blocks_context.{s}.blocks.0.conv.weight"
        nested = f"conv_blocks_context.{s}.0.blocks.0.conv.weight"
        first_convs.append(state[key] if key in state else _require(state, nested))
    features = [int(w.shape[0]) for w in first_convs]
    kernel_sizes = [list(w.shape[2:][::-1]) for w in first_convs]
    strides = [[1, 1, 1]] + [list(_require(state, f"tu.{num_stages - 1 - s}.weight").shape[2:][::-1])
                             for s in range(1, num_stages)]
    common = {"in_channels": stems, "features": features, "kernel_sizes": kernel_sizes, "strides": strides}
    if any(w.ndim != 5 for w in first_convs) or any(len(s) != 3 for s in strides):
        raise IncompatibleCheckpointError("the checkpoint's convolutions are not 3-D (5-D weights); it is not a "
                                          "UniSeg checkpoint")
    try:
        if "intermedia_prompt" not in state:
            heads = _require(state, "seg_outputs_down.0.weight")
            return UniSegConfig("UniSegBackbone", num_classes=int(heads.shape[0]), **common)
        prompt = state["intermedia_prompt"]
        if prompt.ndim != 5:
            raise IncompatibleCheckpointError(f"the checkpoint's intermedia_prompt has shape {tuple(prompt.shape)}, "
                                              "not (1, tasks, z, y, x); it is not a UniSeg checkpoint")
        stride = total_stride(strides)
        patch = [int(n) * s for n, s in zip(prompt.shape[2:][::-1], stride)]
        heads = _require(state, "seg_outputs.0.weight")
        return UniSegConfig("UniSeg", num_tasks=int(prompt.shape[1]), head_channels=int(heads.shape[0]),
                            patch_size=patch, **common)
    except ConfigError as e:
        raise IncompatibleCheckpointError(f"the checkpoint's tensor shapes describe no valid UniSeg: {e}") from e


def build_network(config: UniSegConfig, *, uninitialised: bool = False, network: type[nn.Module] | None = None,
                  tasks: TaskTable | None = None) -> nn.Module:
    """Instantiate the network ``config`` describes (random weights).

    ``uninitialised``: skip the random initialisation and leave the tensors' memory as allocated, for a caller that
    overwrites every tensor next (a strict load of a complete checkpoint); it makes loading ~20x faster.
    ``network``: the class to build, a subclass of ``ARCHITECTURES[config.architecture]`` (default that class), such
    as the Hub-aware ``uniseg_hub.UniSeg``. ``tasks``: the universal model's task table (``task_table``).
    """
    network = network or ARCHITECTURES[config.architecture]
    options = {"tasks": tasks} if config.architecture == "UniSeg" else {}
    if not uninitialised:
        return network(config=config, **options)
    with torch.device("meta"):
        return network(config=config, **options).to_empty(device="cpu")


def _listing(keys: Iterable, limit: int = 10) -> str:
    keys = list(keys)
    shown = ", ".join(str(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


@dataclass
class LoadReport:
    """What a load did: tensors loaded, adapted (with how), skipped from the checkpoint, newly initialised."""

    loaded: list[str] = field(default_factory=list)
    adapted: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors"]
        if self.adapted:
            parts.append("adapted " + "; ".join(f"{k} ({how})" for k, how in self.adapted.items()))
        if self.skipped:
            parts.append(f"skipped {len(self.skipped)} ({_listing(self.skipped, 4)})")
        if self.initialised:
            parts.append(f"newly initialised {len(self.initialised)} ({_listing(self.initialised, 4)})")
        return ", ".join(parts)


def load_checked(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    may_skip: Iterable[str] = (),
    may_initialise: Iterable[str] = (),
    source: str = "checkpoint",
    assign: bool = False,
) -> LoadReport:
    """Strict ``load_state_dict`` with an explicit allow-list.

    ``may_skip`` are glob patterns of checkpoint tensors the module need not take, ``may_initialise`` patterns of
    module tensors the checkpoint need not provide (they keep their fresh initialisation). Anything else missing,
    unexpected or misshaped raises ``IncompatibleCheckpointError`` naming the tensors. ``assign``: the module takes
    the given tensors themselves instead of copies (for a state dict nobody else holds).
    """
    own = module.state_dict()
    skip_ok = list(may_skip)
    init_ok = list(may_initialise)
    matches = lambda key, patterns: any(fnmatch.fnmatchcase(key, p) for p in patterns)  # noqa: E731
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshaped = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
                 for k in own if k in state and state[k].shape != own[k].shape]
    mistyped = [f"{k} {state[k].dtype} != {own[k].dtype}" for k in own if k in state and state[k].dtype != own[k].dtype]
    bad_missing = [k for k in missing if not matches(k, init_ok)]
    bad_unexpected = [k for k in unexpected if not matches(k, skip_ok)]
    problems = []
    if bad_missing:
        problems.append(f"missing {len(bad_missing)} tensors: {_listing(bad_missing)}")
    if bad_unexpected:
        problems.append(f"unexpected {len(bad_unexpected)} tensors: {_listing(bad_unexpected)}")
    if misshaped:
        problems.append(f"{len(misshaped)} tensors with the wrong shape (checkpoint != model): {_listing(misshaped)}")
    if mistyped:
        problems.append(f"{len(mistyped)} tensors with the wrong dtype (checkpoint != model): {_listing(mistyped)}")
    if problems:
        raise IncompatibleCheckpointError(f"{source} does not fit {type(module).__name__}: " + "; ".join(problems))
    # strict: every module tensor is given, the allowed-missing ones keep their fresh initialisation
    module.load_state_dict({**own, **{k: v for k, v in state.items() if k in own}}, strict=True, assign=assign)
    return LoadReport(loaded=[k for k in own if k in state], skipped=unexpected, initialised=missing)


def convert_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], UniSegConfig]:
    """Official state dict -> (our state dict in MONAI axis order, architecture), checked against the network."""
    architecture = infer_architecture(state)
    unmapped = [k for k in state if official_key(k) is None]
    if unmapped:
        raise IncompatibleCheckpointError(f"the checkpoint has {len(unmapped)} unknown tensors: {_listing(unmapped)}")
    check_tensors(state, "the official checkpoint")
    converted = {official_key(k): _reverse_axes(v.detach()) for k, v in state.items()}
    load_checked(build_network(architecture), converted, source="the official checkpoint")
    return converted, architecture


def save_folder(
    out_dir: str | os.PathLike,
    state: Mapping[str, torch.Tensor],
    config: UniSegConfig,
    *,
    source: Mapping | None = None,
    overwrite: bool = False,
    tasks: TaskTable | None = None,
) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (``config``, ``source`` and, unless they are the official
    eleven, ``tasks``) into ``out_dir`` atomically; returns the folder."""
    if tasks is not None and config.architecture == "UniSeg" and len(tasks) != config.total_tasks:
        raise ConfigError(f"the task table lists {len(tasks)} tasks, the network has {config.total_tasks}")
    out = Path(out_dir)
    targets = [out / WEIGHTS_FILE, out / CONFIG_FILE]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise UnisegHubError(f"{', '.join(existing)} already exists; choose another folder or pass overwrite=True")
    out.mkdir(parents=True, exist_ok=True)
    architecture = config.to_dict()
    document = {"format_version": FORMAT_VERSION, **architecture, "axis_order": "MONAI (C, x, y, z)",
                "weights": WEIGHTS_FILE, "source": dict(source or {}), "uniseg_hub_version": __version__}
    if tasks is not None and not tasks.official:
        architecture = {**architecture, "tasks": tasks.to_json()}  # a lone .safetensors file carries its tasks too
    document = {**document, **architecture}
    metadata = {"format": "pt", "uniseg_hub.format_version": str(FORMAT_VERSION),
                "uniseg_hub.architecture": json.dumps(architecture),
                "uniseg_hub.source": json.dumps(dict(source or {})), "uniseg_hub.version": __version__}
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    with atomic_path(targets[0]) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    write_text_atomic(targets[1], format_json(document) + "\n")
    return out


def convert_checkpoint(src: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Convert an official UniSeg ``.model`` file into a folder that ``load_model`` and ``load_encoder`` read."""
    state, config = convert_state_dict(read_official_checkpoint(src))
    source = {"file": Path(src).name, "sha256": sha256_file(src), "format": "nnU-Net v1 .model (state_dict)"}
    return save_folder(out_dir, state, config, source=source, overwrite=overwrite)


def read_safetensors(path: str | os.PathLike, tensors: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, state dict) of a safetensors file, with one clear error; ``tensors=False`` reads the header only
    (the state dict is then empty)."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return f.metadata() or {}, ({k: f.get_tensor(k) for k in f.keys()} if tensors else {})
    except Exception as e:  # safetensors raises its own SafetensorError and OSError
        raise IncompatibleCheckpointError(f"{path} is not a readable safetensors file ({e})") from e


@dataclass(frozen=True)
class Checkpoint:
    """A converted folder (or a lone ``.safetensors`` file) as read: where it is, its architecture, the rest of its
    ``config.json`` (provenance, versions; the metadata's architecture for a lone file) and its tensors (empty when
    they were not read)."""

    path: Path
    config: UniSegConfig
    document: dict
    state: dict[str, torch.Tensor]

    @property
    def tasks(self) -> TaskTable | None:
        """The model's task table (``task_table``)."""
        return task_table(self.document, self.config)


def task_table(document: Mapping, config: UniSegConfig, where: str = "config.json") -> TaskTable | None:
    """The tasks a model's ``config.json`` (or manifest entry) lists, checked against its architecture; without a
    ``tasks`` list the official eleven for an eleven-task universal model, else None (a backbone has no tasks)."""
    if config.architecture != "UniSeg":
        return None
    if "tasks" not in document:
        return OFFICIAL_TASKS if config.total_tasks == len(OFFICIAL_TASKS) else None
    try:
        table = TaskTable.from_json(document["tasks"])
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if len(table) != config.total_tasks:
        raise ConfigError(f"{where} lists {len(table)} tasks but its network has {config.total_tasks} "
                          f"({config.num_tasks} prompted + {len(config.added_tasks)} added); the file is damaged")
    return table

def read_folder(path: str | os.PathLike, tensors: bool = True) -> Checkpoint:
    """A converted folder, or a lone ``.safetensors`` file (architecture from its metadata). The architecture is
    parsed and bounded before any tensor is read; ``tensors=False`` leaves the weights unread (a folder then needs
    only its ``config.json``)."""
    path = Path(path)
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    config_file = weights.parent / CONFIG_FILE
    if not weights.is_file() and (tensors or not path.is_dir() or not config_file.is_file()):  # architecture only
        raise UnisegHubError(
            f"{path} holds no {WEIGHTS_FILE}; pass a folder written by `uniseg-hub convert` or a .safetensors file"
        )
    if config_file.is_file():
        where = str(config_file)
        try:
            text = config_file.read_text(errors="replace")
        except OSError as e:
            raise ConfigError(f"cannot read {config_file} ({e.strerror or e}); check its permissions, or write the "
                              "folder again with `uniseg-hub convert`") from None
    else:
        where, text = f"the metadata of {weights}", read_safetensors(weights, tensors=False)[0].get(
            "uniseg_hub.architecture")
        if text is None:
            raise IncompatibleCheckpointError(f"{weights} has no {CONFIG_FILE} beside it and no architecture metadata")
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise ConfigError(f"{where} is not valid JSON ({reason}); write the folder again with `uniseg-hub convert`") \
            from None
    config = UniSegConfig.from_dict(document, where)
    state = read_safetensors(weights, tensors)[1] if tensors else {}
    if tensors:
        check_tensors(state, f"{weights} (architecture from {where})", config)
    task_table(document, config, where)  # a damaged task list is refused here, before anything is built
    return Checkpoint(weights.parent if path.is_dir() else weights, config, document, state)
