"""Configuration as frozen, validated dataclasses, parsed once where it enters (a file, a manifest, a command line).

``UniSegConfig`` is the architecture of a network as ``config.json``, safetensors metadata and the weights manifest
store it (``{"architecture": name, "config": {...}}``). It checks types, ranges and list lengths, and bounds the
sizes, so that a damaged file is refused with a message naming the field before any tensor is allocated. The
networks, the weights code, the hub and the command line take the object, never the dict.

``ManifestEntry`` is one model of the weights manifest (Hub repository, pinned commit, sha256, licence, architecture
as a ``UniSegConfig``, preprocessing, provenance), checked the same way and raising ``ManifestError``.

Nothing here imports torch: the hub and the command line parse configurations without it.
"""

from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import InitVar, asdict, dataclass, fields, replace

from .errors import ConfigError, ManifestError
from .tasks import TaskTable

FEATURES = (32, 64, 128, 256, 320, 320)
KERNEL_SIZES = ((3, 3, 1),) + ((3, 3, 3),) * 5
STRIDES = ((1, 1, 1), (2, 2, 1)) + ((2, 2, 2),) * 4
IN_CHANNELS = (1, 2, 4)
PATCH_SIZE = (192, 192, 64)
NUM_TASKS = 11
HEAD_CHANNELS = 4
"""The official 11-task model (MONAI axis order), ``shared/reference/uniseg-official.md`` §1."""

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
"""The two files of a converted folder and of a published repository (``weights.save_folder`` writes them)."""

ARCHITECTURES = ("UniSeg", "UniSegBackbone")
UNIVERSAL_ONLY = ("num_tasks", "head_channels", "patch_size", "added_tasks")
"""Fields of the universal model that a backbone does not have (and ``num_classes`` the other way round)."""

MAX_STAGES = 8
MAX_FEATURES = 4096
MAX_KERNEL = 7
MAX_STRIDE = 8
MAX_CHANNELS = 64
MAX_TASKS = 1024
MAX_CLASSES = 1024
MAX_PATCH_VOXELS = 1 << 27
MAX_PARAMETERS = 500_000_000
"""Bounds well above any UniSeg variant (the official model has 32 million parameters): a configuration beyond them
is damaged, and building it would allocate gigabytes before any shape check could fail."""

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 80, 80
_REPR.maxlist = _REPR.maxdict = _REPR.maxtuple = _REPR.maxset = 8


def _shown(value) -> str:
    """``repr(value)`` cut to a readable length and depth (a damaged file may hold huge or deeply nested values)."""
    return _REPR.repr(value)


_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off", "none", "")


def parse_bool(value, name: str = "option") -> bool:
    """A switch from a config, a command line or a bundle override: ``true/false``, ``yes/no``, ``on/off``, ``1/0``.

    fire and MONAI's config parser pass ``--resume false`` as the string 'false', which Python would take as true.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"{name} takes true or false, got {_shown(value)}")


def _whole(value, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be a whole number from {low} to {high}, got {_shown(value)}")
    return value


def _whole_list(value, name: str, low: int, high: int, length: int | None = None) -> tuple[int, ...]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise ConfigError(f"{name} must be a list of whole numbers, got {_shown(value)}")
    if length is not None and len(value) != length:
        raise ConfigError(f"{name} must have {length} entries, got {len(value)}: {_shown(list(value))}")
    return tuple(_whole(v, f"{name}[{i}]", low, high) for i, v in enumerate(value))


def _triples(value, name: str, low: int, high: int, stages: int) -> tuple[tuple[int, int, int], ...]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence) or len(value) != stages:
        raise ConfigError(f"{name} must be a list of {stages} (x, y, z) triples, one per stage, got {_shown(value)}")
    return tuple(_whole_list(v, f"{name}[{i}]", low, high, 3) for i, v in enumerate(value))


@dataclass(frozen=True)
class UniSegConfig:
    """The architecture of a UniSeg network (MONAI axis order); defaults are the official 11-task model.

    Attributes:
        architecture: ``"UniSeg"`` (the universal, prompted model) or ``"UniSegBackbone"`` (the downstream network).
        in_channels: channel counts with an input stem of their own, e.g. (1, 2, 4).
        features, kernel_sizes, strides: per-stage lists; stage 0 is not strided.
        num_tasks, head_channels, patch_size: the universal model's prompt channels, shared head width and training
            patch (the prompt's size is the patch divided by the total stride). Unused by the backbone.
        added_tasks: classes (background included) of each task added after training (``uniseg-hub add-task``), ids
            ``num_tasks``, ``num_tasks + 1``, ...: each has its own prompt channel, decoder adapters and heads
            (``networks.AddedTask``). Empty for the official model. Unused by the backbone.
        num_classes: the backbone's output classes, background included. Unused by the universal model.
    """

    architecture: str = "UniSeg"
    in_channels: tuple[int, ...] = IN_CHANNELS
    features: tuple[int, ...] = FEATURES
    kernel_sizes: tuple[tuple[int, int, int], ...] = KERNEL_SIZES
    strides: tuple[tuple[int, int, int], ...] = STRIDES
    num_tasks: int = NUM_TASKS
    head_channels: int = HEAD_CHANNELS
    patch_size: tuple[int, int, int] = PATCH_SIZE
    num_classes: int | None = None
    added_tasks: tuple[int, ...] = ()

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"architecture must be one of {', '.join(ARCHITECTURES)}, "
                              f"got {_shown(self.architecture)}")
        features = _whole_list(self.features, "features", 1, MAX_FEATURES)
        if not 2 <= len(features) <= MAX_STAGES:
            raise ConfigError(f"features must list 2 to {MAX_STAGES} stages, got {len(features)}")
        stages = len(features)
        kernels = _triples(self.kernel_sizes, "kernel_sizes", 1, MAX_KERNEL, stages)
        strides = _triples(self.strides, "strides", 1, MAX_STRIDE, stages)
        if strides[0] != (1, 1, 1):
            raise ConfigError(f"strides[0] must be [1, 1, 1] (the first stage keeps the input size), got {strides[0]}")
        stems = _whole_list(self.in_channels, "in_channels", 1, MAX_CHANNELS)
        if not stems or len(set(stems)) != len(stems):
            raise ConfigError(f"in_channels must list distinct channel counts, got {list(stems)}")
        values = {"features": features, "kernel_sizes": kernels, "strides": strides, "in_channels": stems}
        if self.architecture == "UniSeg":
            values["num_tasks"] = _whole(self.num_tasks, "num_tasks", 1, MAX_TASKS)
            values["head_channels"] = _whole(self.head_channels, "head_channels", 1, MAX_CLASSES)
            patch = _whole_list(self.patch_size, "patch_size", 1, MAX_PATCH_VOXELS, 3)
            stride = total_stride(strides)
            if any(p % s for p, s in zip(patch, stride)) or math.prod(patch) > MAX_PATCH_VOXELS:
                raise ConfigError(f"patch_size {list(patch)} must be divisible by the total stride {list(stride)} "
                                  f"and hold at most {MAX_PATCH_VOXELS} voxels")
            values["patch_size"] = patch
            values["added_tasks"] = _whole_list(self.added_tasks, "added_tasks", 2, MAX_CLASSES)
            if values["num_tasks"] + len(values["added_tasks"]) > MAX_TASKS:
                raise ConfigError(f"a model holds at most {MAX_TASKS} tasks, got {values['num_tasks']} + "
                                  f"{len(values['added_tasks'])} added")
            if self.num_classes is not None:
                raise ConfigError("num_classes belongs to a UniSegBackbone; the universal model has head_channels")
        else:
            values["num_classes"] = _whole(self.num_classes, "num_classes", 1, MAX_CLASSES)
        for name, value in values.items():
            object.__setattr__(self, name, value)
        if (count := self.parameter_estimate()) > MAX_PARAMETERS:
            raise ConfigError(f"this architecture would have about {count:,} parameters, more than the "
                              f"{MAX_PARAMETERS:,} any UniSeg variant needs; the configuration is damaged")

    @classmethod
    def from_dict(cls, data, where: str = "the configuration") -> UniSegConfig:
        """Parse ``{"architecture": name, "config": {...}}`` (config.json, safetensors metadata, a manifest entry);
        other top-level keys are ignored. Raises ``ConfigError`` naming ``where`` and the field."""
        if not isinstance(data, Mapping) or not isinstance(data.get("config"), Mapping):
            raise ConfigError(f"{where} must hold an 'architecture' name and a 'config' object, got {_shown(data)}")
        config = data["config"]
        architecture = data.get("architecture")
        allowed = {f.name for f in fields(cls)} - {"architecture"}
        allowed -= {"num_classes"} if architecture == "UniSeg" else set(UNIVERSAL_ONLY)
        unknown = sorted(str(k) for k in config if k not in allowed)
        if unknown:
            raise ConfigError(f"{where}: unknown {architecture} field(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(allowed))}")
        try:
            return cls(architecture=architecture, **config)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_dict(self) -> dict:
        """``{"architecture", "config"}`` with JSON lists, as config.json stores it."""
        values = asdict(self)
        drop = {"architecture", *(("num_classes",) if self.architecture == "UniSeg" else UNIVERSAL_ONLY)}
        if not self.added_tasks:
            drop.add("added_tasks")  # the official model's config.json stays as it was
        as_lists = lambda v: [as_lists(x) for x in v] if isinstance(v, tuple) else v  # noqa: E731
        return {"architecture": self.architecture,
                "config": {k: as_lists(v) for k, v in values.items() if k not in drop}}

    def backbone(self, num_classes: int, in_channels: Sequence[int] | None = None) -> UniSegConfig:
        """The downstream backbone of this architecture with ``num_classes`` classes (and other stems if given)."""
        return replace(self, architecture="UniSegBackbone", num_classes=num_classes,
                       in_channels=self.in_channels if in_channels is None else tuple(in_channels),
                       num_tasks=NUM_TASKS, head_channels=HEAD_CHANNELS, patch_size=PATCH_SIZE, added_tasks=())

    @property
    def total_stride(self) -> tuple[int, int, int]:
        """Product of all stage strides per axis: the factor an input size must be divisible by."""
        return total_stride(self.strides)

    @property
    def total_tasks(self) -> int:
        """Tasks of the universal model: the prompted ``num_tasks`` and the added ones."""
        return self.num_tasks + len(self.added_tasks)

    def with_added_task(self, num_classes: int) -> UniSegConfig:
        """This universal model with one more added task of ``num_classes`` classes (background included)."""
        if self.architecture != "UniSeg":
            raise ConfigError("tasks can be added to the universal model (UniSeg) only, not to a backbone")
        return replace(self, added_tasks=(*self.added_tasks, num_classes))

    @property
    def prompt_size(self) -> tuple[int, int, int]:
        """The universal prompt's spatial size: the training patch divided by the total stride."""
        return tuple(p // s for p, s in zip(self.patch_size, self.total_stride))

    def parameter_estimate(self) -> int:
        """Convolution weights of encoder and decoder (a lower bound of the parameter count), to bound sizes."""
        f, k, s = self.features, self.kernel_sizes, self.strides
        total = sum(c * f[0] * math.prod(k[0]) for c in self.in_channels)
        for i in range(len(f)):
            previous = f[i - 1] if i else f[0]
            total += (previous + f[i]) * f[i] * math.prod(k[i])
            if i:
                total += f[i] * f[i - 1] * math.prod(s[i]) + 3 * f[i - 1] * f[i - 1] * math.prod(k[i])
        if self.architecture == "UniSeg":  # the universal prompt and its fusion convs
            tasks, hidden = self.num_tasks, (f[-1] + self.num_tasks) // 4
            total += tasks * math.prod(self.prompt_size)
            total += ((f[-1] + tasks) * hidden + hidden * hidden + hidden * tasks) * math.prod(k[-1])
        return total


def total_stride(strides) -> tuple[int, int, int]:
    return tuple(math.prod(s[axis] for s in strides) for axis in range(3))


# ----------------------------------------------------------------------------------------------- manifest entries
# One model of the weights manifest (``weights_manifest.json``), parsed once by ``ManifestEntry.from_dict``; the hub,
# ``load_model`` and the command line read its attributes. Its nested JSON objects (preprocessing, source) are
# ``FrozenMap``s: read-only, hashable, lists as tuples; ``to_dict()`` gives the manifest's JSON back.

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
_SHA1 = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_URL = re.compile(r"https?://\S+")
_PINNED = ("repo_id", "revision", "sha256", "size")
ENTRY_FIELDS = ("name", "description", "published", *_PINNED, "filename", "format", "license", "architecture",
                "preprocessing", "source")
"""The fields every manifest entry has (``upstream``, ``notes`` and ``tasks`` are optional), in the order the
manifest writes them."""
ENTRY_OPTIONAL = ("upstream", "notes", "tasks")
LICENSE_FIELDS = ("id", "name", "url", "commercial_use")
_LICENSE_TEXTS = ("commercial_contact", "notes")
UPSTREAM_FIELDS = ("url", "filename", "format", "size", "sha256")
UPSTREAM_FORMAT = "nnU-Net v1 .model"


def freeze(value):
    """A JSON value made read-only: objects become ``FrozenMap``s, lists tuples (``thaw`` undoes it)."""
    if isinstance(value, Mapping):
        return value if isinstance(value, FrozenMap) else FrozenMap(value)
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value):
    """The JSON form of a frozen value: ``FrozenMap``s become dicts, tuples lists."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [thaw(v) for v in value]
    return value


class FrozenMap(Mapping):
    """A read-only, hashable mapping of frozen JSON values (see ``freeze``); equal to a dict with equal items."""

    __slots__ = ("_data",)

    def __init__(self, data=()):
        object.__setattr__(self, "_data", {k: freeze(v) for k, v in dict(data).items()})

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __delattr__(self, name):
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __reduce__(self):
        return type(self), (self._data,)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._data!r})"

    def to_dict(self) -> dict:
        """The JSON form: a new dict of plain dicts and lists."""
        return thaw(self)


def _is_json(value) -> bool:
    """A JSON value: objects with string keys, lists, strings, finite numbers, true/false, null."""
    if value is None or isinstance(value, (str, bool, int)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_is_json(v) for v in value)
    return False


def _json_object(value, name: str) -> FrozenMap:
    """``value`` frozen, or ``ManifestError`` (without a prefix) if it is not a JSON object."""
    try:
        plain = isinstance(value, Mapping) and _is_json(value)
    except RecursionError:
        plain = False
    if not plain:
        raise ManifestError(f"{name} must be a JSON object (string keys; strings, finite numbers, true/false, null, "
                            "lists and objects as values)")
    return freeze(value)


def _repository_path(name) -> bool:
    """A relative ``.safetensors`` path inside a repository that cannot leave it on any system: '/'-separated
    segments, none empty, '.' or '..', and no backslash (a separator on Windows), colon (a drive) or control
    character."""
    if not isinstance(name, str) or not name.endswith(".safetensors") or len(name) > 1000:
        return False
    if any(c in name for c in "\\:") or any(ord(c) < 32 or ord(c) == 127 for c in name):
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def _is_int(value, minimum: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


@dataclass(frozen=True, kw_only=True)
class License:
    """The licence of a model's weights: SPDX-style ``id``, ``name``, ``url`` (http/https), ``commercial_use``, and
    optionally ``commercial_contact`` and ``notes``; ``extra`` keeps any other field the manifest gives."""

    id: str
    name: str
    url: str
    commercial_use: bool
    commercial_contact: str | None = None
    notes: str | None = None
    extra: FrozenMap = FrozenMap()

    def __post_init__(self):
        if not all(isinstance(getattr(self, k), str) for k in ("id", "name", "url")) \
                or not isinstance(self.commercial_use, bool) or not _URL.fullmatch(self.url):
            raise ManifestError("license must hold id, name, url (http/https) and commercial_use (true or false)")
        for k in _LICENSE_TEXTS:
            if getattr(self, k) is not None and not isinstance(getattr(self, k), str):
                raise ManifestError(f"license.{k} must be a string (or absent), got {getattr(self, k)!r:.80}")
        extra = _json_object(self.extra, "license")
        if clash := [k for k in extra if k in LICENSE_FIELDS + _LICENSE_TEXTS]:
            raise ManifestError(f"license.extra repeats the field(s) {', '.join(clash)}")
        object.__setattr__(self, "extra", extra)

    @classmethod
    def from_dict(cls, data) -> License:
        """Parse the manifest's ``license`` object; ``ManifestError`` otherwise."""
        if not isinstance(data, Mapping) or not all(k in data for k in LICENSE_FIELDS):
            raise ManifestError("license must hold id, name, url (http/https) and commercial_use (true or false)")
        for k in _LICENSE_TEXTS:
            if k in data and not isinstance(data[k], str):
                raise ManifestError(f"license.{k} must be a string (or absent), got {_shown(data[k])}")
        known = LICENSE_FIELDS + _LICENSE_TEXTS
        return cls(**{k: data[k] for k in known if k in data},
                   extra={k: v for k, v in data.items() if k not in known})

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in LICENSE_FIELDS}
        out.update({k: getattr(self, k) for k in _LICENSE_TEXTS if getattr(self, k) is not None})
        return {**out, **thaw(self.extra)}


@dataclass(frozen=True)
class Upstream:
    """Where the original checkpoint of a model lives, for a conversion on first use: ``url`` (http/https; a Google
    Drive link is fine), ``filename`` (a plain file name), ``format`` (only ``"nnU-Net v1 .model"``), and ``size``
    (bytes) and ``sha256`` when known; None means unknown, never a guess."""

    url: str
    filename: str
    format: str = UPSTREAM_FORMAT
    size: int | None = None
    sha256: str | None = None

    def __post_init__(self):
        if not isinstance(self.url, str) or not _URL.fullmatch(self.url):
            raise ManifestError(f"upstream.url {_shown(self.url)} must be an http(s) URL")
        if not isinstance(self.filename, str) or not self.filename.strip() or "/" in self.filename \
                or "\\" in self.filename or self.filename in (".", ".."):
            raise ManifestError(f"upstream.filename {_shown(self.filename)} must be a plain file name")
        if self.format != UPSTREAM_FORMAT:
            raise ManifestError(f"upstream.format {_shown(self.format)} is not supported; uniseg-hub converts "
                                f"{UPSTREAM_FORMAT!r} files only")
        if self.size is not None and not _is_int(self.size):
            raise ManifestError(f"upstream.size {_shown(self.size)} must be the file size in bytes, or null (unknown)")
        if self.sha256 is not None and not (isinstance(self.sha256, str) and _SHA256.fullmatch(self.sha256)):
            raise ManifestError(f"upstream.sha256 {_shown(self.sha256)} must be 64 lower-case hex digits, or null "
                                "(unknown)")

    @classmethod
    def from_dict(cls, data) -> Upstream:
        """Parse the manifest's ``upstream`` object (every field present, ``size`` and ``sha256`` may be null)."""
        if not isinstance(data, Mapping) or set(data) != set(UPSTREAM_FIELDS):
            raise ManifestError(f"upstream must be an object with exactly {', '.join(UPSTREAM_FIELDS)} (size and "
                                "sha256 null when unknown)")
        return cls(**data)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in UPSTREAM_FIELDS}


@dataclass(frozen=True, kw_only=True)
class ManifestEntry:
    """One model of the weights manifest, validated: its Hub copy, licence, architecture and provenance.

    Attributes:
        name: lower-case letters, digits, '.', '_' or '-'.
        description: one line for ``uniseg-hub list``.
        published: whether a converted copy is on the Hub. Only then are ``repo_id`` (ORG/NAME), ``revision`` (the
            40-hex commit), ``sha256`` and ``size`` (bytes) of ``filename`` set; an unpublished entry has them None.
        filename, format: the weights file in the repository (a relative ``.safetensors`` path; "safetensors").
        license: a ``License``.
        architecture: the network, a ``UniSegConfig``.
        preprocessing, source: read-only JSON objects (``FrozenMap``): at least ``axis_order``; ``paper``, ``code``
            and ``code_commit`` (plus ``original_url`` while unpublished, ``original_sha256`` when known).
        upstream: an ``Upstream`` (the original checkpoint, fetched and converted on first use when the entry is
            not published), or None.
        notes: free text, or None.
        tasks: the model's ``TaskTable`` when it is not the official eleven (tasks added by ``add-task``), as its
            config.json lists it: what ``predict`` resolves ``--task`` against before any download; else None.

    Built from JSON by ``from_dict``, back to JSON by ``to_dict``. Direct construction (and ``dataclasses.replace``)
    runs the same checks; ``license``, ``architecture``, ``preprocessing`` and ``source`` may then be given in
    their JSON form. ``where`` names the entry in messages; ``require_revision=False`` lets a published entry
    have no revision yet (``publish --dry-run``).
    """

    name: str
    description: str
    published: bool
    repo_id: str | None = None
    revision: str | None = None
    sha256: str | None = None
    size: int | None = None
    filename: str
    format: str = "safetensors"
    license: License
    architecture: UniSegConfig
    preprocessing: FrozenMap
    source: FrozenMap
    upstream: Upstream | None = None
    notes: str | None = None
    tasks: TaskTable | None = None
    where: InitVar[str] = "entry"
    require_revision: InitVar[bool] = True

    def __post_init__(self, where: str, require_revision: bool):
        def fail(message: str):
            raise ManifestError(f"{where}: {message}")

        name = self.name
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            fail(f"name {_shown(name)} must be lower-case letters, digits, '.', '_' or '-', starting with a letter or "
                 "digit")
        where = f"{where} ({name})"
        if not isinstance(self.description, str) or not self.description.strip():
            fail("description must be a non-empty string")
        if not isinstance(self.published, bool):
            fail("published must be true or false")
        if self.published:
            repo_id = self.repo_id
            try:
                _validate_repo_id(repo_id)
            except (ValueError, TypeError) as e:
                fail(f"repo_id {_shown(repo_id)} is not a Hub repository id ({e})")
            if not isinstance(repo_id, str) or "/" not in repo_id:  # huggingface_hub lets None through
                fail(f"repo_id {_shown(repo_id)} must be ORG/NAME")
            revision = self.revision
            if not (revision is None and not require_revision) and not (
                    isinstance(revision, str) and _SHA1.fullmatch(revision)):
                fail(f"revision {_shown(revision)} must be a 40-hex commit sha (never a branch or tag): the commit "
                     "that `uniseg-hub publish` printed")
            if not isinstance(self.sha256, str) or not _SHA256.fullmatch(self.sha256):
                fail(f"sha256 {_shown(self.sha256)} must be 64 lower-case hex digits")
            if not _is_int(self.size):
                fail(f"size {_shown(self.size)} must be the file size in bytes")
        else:
            invented = [k for k in _PINNED if getattr(self, k) is not None]
            if invented:
                fail(f"an unpublished entry has no {', '.join(invented)}: leave them null until `uniseg-hub publish` "
                     "prints the real values, and set published to true then")
        filename = self.filename
        if not _repository_path(filename):
            fail(f"filename {_shown(filename)} must be a relative path to a .safetensors file in the repository "
                 "(segments separated by '/', no '.', '..', backslash, colon or control character)")
        if self.format != "safetensors":
            fail(f"format {_shown(self.format)} is not supported; uniseg-hub loads safetensors only")
        try:
            license_ = self.license if isinstance(self.license, License) else License.from_dict(self.license)
        except ManifestError as e:
            fail(str(e))
        architecture = self.architecture
        if not isinstance(architecture, UniSegConfig):
            if not isinstance(architecture, Mapping) or set(architecture) != {"architecture", "config"}:
                fail("architecture must be {\"architecture\": NAME, \"config\": {...}}, as `uniseg-hub convert` "
                     "writes it to config.json")
            try:
                architecture = UniSegConfig.from_dict(architecture, "architecture")
            except ConfigError as e:
                fail(str(e))
        preprocessing = self.preprocessing
        if not isinstance(preprocessing, Mapping) or not isinstance(preprocessing.get("axis_order"), str):
            fail("preprocessing must be an object with at least axis_order")
        source = self.source
        if not isinstance(source, Mapping) or not all(isinstance(source.get(k), str) for k in ("paper", "code")) \
                or not (isinstance(source.get("code_commit"), str) and _SHA1.fullmatch(source["code_commit"])):
            fail("source must hold paper, code and code_commit (the official code's 40-hex commit)")
        if source.get("original_sha256") is not None and not _SHA256.fullmatch(str(source["original_sha256"])):
            fail("source.original_sha256 must be 64 lower-case hex digits or null (unknown)")
        if not self.published and not (isinstance(source.get("original_url"), str)
                                       and _URL.fullmatch(source["original_url"])):
            fail("an unpublished entry must say where the original is: source.original_url")
        if self.notes is not None and not isinstance(self.notes, str):
            fail("notes must be a string")
        try:
            upstream = self.upstream if self.upstream is None or isinstance(self.upstream, Upstream) \
                else Upstream.from_dict(self.upstream)
        except ManifestError as e:
            fail(str(e))
        tasks = self.tasks
        if tasks is not None and not isinstance(tasks, TaskTable):
            try:
                tasks = TaskTable.from_json(tasks)
            except ConfigError as e:
                fail(str(e))
        if tasks is not None and (architecture.architecture != "UniSeg" or len(tasks) != architecture.total_tasks):
            fail(f"tasks lists {len(tasks)} tasks, but the architecture has "
                 f"{architecture.total_tasks if architecture.architecture == 'UniSeg' else 'none'}")
        try:
            values = {"license": license_, "architecture": architecture, "upstream": upstream, "tasks": tasks,
                      "preprocessing": _json_object(preprocessing, "preprocessing"),
                      "source": _json_object(source, "source")}
        except ManifestError as e:
            fail(str(e))
        for key, value in values.items():
            object.__setattr__(self, key, value)

    @classmethod
    def from_dict(cls, data, where: str = "entry", *, require_revision: bool = True) -> ManifestEntry:
        """Parse one entry of the manifest's ``models`` list; ``ManifestError`` naming ``where``, the field and the
        fix otherwise. ``require_revision=False`` accepts a published entry whose commit is not known yet."""
        def fail(message: str):
            raise ManifestError(f"{where}: {message}")

        if not isinstance(data, Mapping):
            fail("an entry must be a JSON object")
        missing = [k for k in ENTRY_FIELDS if k not in data]
        unknown = [k for k in data if k not in ENTRY_FIELDS + ENTRY_OPTIONAL]
        if missing:
            fail(f"missing field(s) {', '.join(missing)}")
        if unknown:
            fail(f"unknown field(s) {', '.join(map(str, unknown))}; the fields are "
                 f"{', '.join(ENTRY_FIELDS + ENTRY_OPTIONAL)}")
        notes = data.get("notes")
        entry = cls(**{k: data[k] for k in ENTRY_FIELDS}, upstream=data.get("upstream"), tasks=data.get("tasks"),
                    notes=notes if isinstance(notes, str) else None, where=where, require_revision=require_revision)
        if "notes" in data and not isinstance(notes, str):
            raise ManifestError(f"{where} ({entry.name}): notes must be a string")
        return entry

    def to_dict(self) -> dict:
        """The JSON form, as the manifest writes it (the fields in manifest order; ``notes`` only when set)."""
        out = {k: getattr(self, k) for k in ("name", "description", "published", *_PINNED, "filename", "format")}
        out.update(license=self.license.to_dict(), architecture=self.architecture.to_dict(),
                   preprocessing=thaw(self.preprocessing), source=thaw(self.source))
        if self.upstream is not None:
            out["upstream"] = self.upstream.to_dict()
        if self.notes is not None:
            out["notes"] = self.notes
        if self.tasks is not None:
            out["tasks"] = self.tasks.to_json()
        return out


def _validate_repo_id(repo_id) -> None:
    """huggingface_hub's check of a repository id (imported on first use: most users of this module never need
    it)."""
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo_id)


@dataclass(frozen=True)
class PredictOptions:
    """The options of one prediction (``uniseg_hub.app.predict.predict``, ``uniseg-hub predict``), parsed and checked
    once, here; ``predict`` hands them to the bundle as overrides. Strings from a command line are accepted
    (``"false"``, ``"0.25"``, ``"2"``); a wrong value raises ``ConfigError`` naming the option and what it takes.

    Attributes:
        task: a task name or id, or ``"all"`` (checked by the bundle against the input's channels).
        out_dir: the output folder. weights: a manifest model name or a converted folder.
        device: ``None`` (the bundle's default: CUDA when available) or what ``torch.device`` takes (``cpu``,
            ``cuda``, ``cuda:1``), normalised by it.
        tta: test-time flips, 8 (official), 4, 2 or 1, or a switch (true = 8, false = 1) (``parse_tta``).
        probabilities, preview, overwrite, progress: switches (``parse_bool``).
        overlap: the sliding windows' overlap, in [0, 1): nnU-Net's ``step_size`` is ``1 - overlap`` (with the
            ``nnunet`` window the windows are spread evenly, at most ``1 - overlap`` of a patch apart).
        sw_batch_size: windows per network call, 1 or more.
        precision: ``PRECISIONS`` (``auto``: the official float16 autocast on CUDA, float32 on CPU).
        fast: the ``FAST_PRESET`` for the TTA level and overlap left at their official defaults.
        modality: ``CT`` or ``MR``, the group ``task="all"`` takes for 1-channel input.
        resampling, nan, normalization_mask, window: the official behaviour by default, deviations on request
            (``RESAMPLING``, ``NAN_POLICIES``, ``NORMALIZATION_MASKS``, ``WINDOWS``).
        format: the label map's extra format beside the NIfTI (``FORMATS``): ``nifti`` (none), ``seg.nrrd`` (3D
            Slicer) or ``dicom-seg`` (a DICOM Segmentation; DICOM series input only).
    """

    task: str = "liver"
    out_dir: str = "uniseg-output"
    weights: str = "uniseg-11task"
    device: str | None = None
    tta: int | bool = 8
    overlap: float = 0.5
    probabilities: bool = False
    preview: bool = True
    overwrite: bool = False
    progress: bool = True
    modality: str = "CT"
    sw_batch_size: int = 1
    resampling: str = "nnunet"
    nan: str = "zero"
    normalization_mask: str = "training"
    window: str = "nnunet"
    format: str = "nifti"
    precision: str = "auto"  # speed options (issue 17): precision, fast; tta takes a level
    fast: bool = False

    def __post_init__(self):
        import os

        values = {}
        for name in ("task", "out_dir", "weights"):
            value = getattr(self, name)
            text = "" if isinstance(value, bool) or not isinstance(value, (str, int, os.PathLike)) else \
                os.fspath(value) if isinstance(value, os.PathLike) else str(value)
            if not text.strip():
                raise ConfigError(f"{name} must be a non-empty name or path, got {_shown(value)}")
            values[name] = text.strip() if name == "task" else text
        for name in ("probabilities", "preview", "overwrite", "progress", "fast"):
            values[name] = parse_bool(getattr(self, name), name)
        values["overlap"] = _overlap(self.overlap)
        values["precision"] = parse_precision(self.precision)  # speed options (issue 17)
        values["tta"], values["overlap"] = apply_fast_preset(parse_tta(self.tta), values["overlap"], values["fast"])
        values["sw_batch_size"] = _at_least_one(self.sw_batch_size, "sw_batch_size")
        modality = str(self.modality).strip().upper() if isinstance(self.modality, str) else None
        if modality not in ("CT", "MR"):
            raise ConfigError(f"modality must be CT or MR (the task group --task all uses for 1-channel input), got "
                              f"{_shown(self.modality)}")
        values["modality"] = modality
        values["resampling"] = choice(self.resampling, "resampling", RESAMPLING)
        values["nan"] = choice(self.nan, "nan", NAN_POLICIES)
        values["normalization_mask"] = choice(self.normalization_mask, "normalization_mask", NORMALIZATION_MASKS)
        values["window"] = choice(self.window, "window", WINDOWS)
        values["format"] = choice(self.format, "format", FORMATS)
        values["device"] = None if self.device is None else _device(self.device)
        if values["probabilities"] and values["task"].lower() == "all":
            raise ConfigError(ALL_TASKS_PROBABILITIES)
        for name, value in values.items():
            object.__setattr__(self, name, value)


ALL_TASKS_PROBABILITIES = (
    "probabilities are not written for task all: its label map merges each task's argmax (later tasks win), so no "
    "probability map belongs to it; run the tasks one by one with --probabilities (e.g. --task liver)")
"""Why ``task="all"`` with probabilities is refused (``PredictOptions``, ``pipeline.MergeTasksd``)."""


RESAMPLING = ("nnunet", "monai")
"""``nnunet``: the official grid and cubic spline (``pipeline.ResampleToSpacingd``); ``monai``: MONAI's
``Spacingd``, trilinear on a centre-aligned grid of the exact target spacing (a deviation)."""
WINDOWS = ("nnunet", "monai")
"""``nnunet``: the official sliding window (``pipeline.sliding_window``: nnU-Net v1's evenly spread positions and
Gaussian map); ``monai``: MONAI's ``SlidingWindowInferer`` (fixed step, last window at the border, MONAI's Gaussian
clamped to 1e-3; a deviation)."""
NAN_POLICIES = ("zero", "refuse")
"""``zero``: NaN voxels become 0 with a warning that counts them, as the official preprocessing does; ``refuse``:
one error."""
NORMALIZATION_MASKS = ("training", "none")
"""BraTS z-scoring: ``training`` over the non-zero voxels, as the weights were trained; ``none`` over the whole
image, as the official ``predict.py`` does (it disables the masks)."""
FORMATS = ("nifti", "seg.nrrd", "dicom-seg")
"""The label map's formats: ``nifti`` alone (always written, with colour tables beside it), or also a 3D Slicer
``.seg.nrrd`` or a DICOM Segmentation (``pipeline.label_files``)."""


def choice(value, name: str, choices: tuple[str, ...]) -> str:
    """``value`` as one of ``choices`` (case and surrounding blanks ignored), or a ``ConfigError`` listing them."""
    text = value.strip().lower() if isinstance(value, str) else None
    if text not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {_shown(value)}")
    return text


def _overlap(value) -> float:
    try:
        overlap = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        overlap = math.nan
    if not 0 <= overlap < 1:  # NaN fails too
        raise ConfigError(f"overlap must be a number from 0 up to (not including) 1, e.g. 0.5 (the official "
                          f"sliding-window overlap), got {_shown(value)}")
    return overlap


def _at_least_one(value, name: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a whole number of 1 or more, got {_shown(value)}")
    return value


def _device(value) -> str:
    """``value`` as ``torch.device`` reads it (torch is imported here, on first use: config.py does not need it)."""
    import torch

    try:
        return str(torch.device(value if isinstance(value, (str, torch.device)) else str(value)))
    except (RuntimeError, TypeError, ValueError) as e:
        raise ConfigError(f"device must be cpu, cuda or cuda:N, got {_shown(value)}") from e


# ------------------------------------------------------------------ speed options (issue 17): precision, TTA, --fast

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
"""Arithmetic of the network. ``auto`` is the official inference: float16 autocast on CUDA, float32 on CPU;
``fp32`` float32 everywhere; ``bf16`` bfloat16 autocast (opt-in on CPU: fast only where the CPU has native bfloat16,
AMX or AVX512_BF16); ``fp16`` float16 autocast (CUDA only)."""
_PRECISION_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}

TTA_LEVELS = (8, 4, 2, 1)
"""Test-time mirroring: the flips over every subset of the three spatial axes (8, the official default), of the two
in-plane axes x and y (4), of x alone (2), or none (1)."""

FAST_PRESET = {"tta": 8, "overlap": 0.25}
"""What ``--fast`` sets: only the choices whose per-label Dice against the official settings stayed >= 0.98 on the
sample CT (``benchmarks/agreement.py``; README, Performance). Measured with seeded weights (the official ones are
unreachable here): overlap 0.25 qualifies (Dice 1.0: on scans under two patches per axis it gives the official
windows; on larger scans it runs about 2.4x fewer windows); fewer TTA flips did not (liver 0.96 with 4 flips) and
neither did bf16 (0.91), so the preset keeps the 8 flips and float32. Re-measure with the official weights."""


def parse_precision(value) -> str:
    """``value`` as one of ``PRECISIONS`` (``float32``/``bfloat16``/``float16``/``half`` and a torch dtype's name
    accepted), or a ``ConfigError`` listing them. ``None`` is ``auto``."""
    if value is None:
        return "auto"
    text = str(value).strip().lower().removeprefix("torch.")
    text = _PRECISION_ALIASES.get(text, text)
    if text not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)} (auto: float16 autocast on CUDA, "
                          f"float32 on CPU, as the official inference), got {_shown(value)}")
    return text


def parse_tta(value, name: str = "tta") -> int:
    """The number of test-time flips: 8, 4, 2 or 1 (``TTA_LEVELS``), or a switch as before (true = 8, false = 1).

    ``1`` is one flip (no mirroring), no longer the switch value ``1`` = on; ``0`` is off.
    """
    if isinstance(value, bool):
        return 8 if value else 1
    text = str(value).strip().lower()
    if text.isdigit() and int(text) in TTA_LEVELS:
        return int(text)
    try:
        return 8 if parse_bool(value, name) else 1
    except ConfigError:
        raise ConfigError(f"{name} must be 8, 4, 2 or 1 test-time flips (all three axes, x and y, x, none; 8 is the "
                          f"official default), or true/false (8/1), got {_shown(value)}") from None


def apply_fast_preset(tta: int, overlap: float, fast: bool) -> tuple[int, float]:
    """``--fast``: ``FAST_PRESET``'s TTA level and overlap where the given ones are the official defaults (8, 0.5);
    a value the user chose otherwise stays."""
    if not fast:
        return tta, overlap
    return (FAST_PRESET["tta"] if tta == 8 else tta), (FAST_PRESET["overlap"] if overlap == 0.5 else overlap)
