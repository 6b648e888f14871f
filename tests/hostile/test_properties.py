"""Property-based tests (hypothesis): random JSON at the manifest and model-configuration parsers, random and
damaged bytes at the checkpoint readers (safetensors, the official pickle) and at the NIfTI reading of the
inference pipeline. Every outcome is a valid object or a typed ``UnisegHubError``, never another exception, and
never a hang (a deadline per example, few examples: the file runs in well under a minute on two cores)."""

import copy
import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from uniseg_hub.app.predict import unwrap_error
from uniseg_hub.config import MAX_PARAMETERS, ManifestEntry, UniSegConfig
from uniseg_hub.errors import ConfigError, ManifestError, UnisegHubError
from uniseg_hub.hub.manifest import Manifest, load_manifest, packaged_manifest, parse_manifest
from uniseg_hub.pipeline import CheckImaged, CheckInputFilesd
from uniseg_hub.pipeline.cases import CaseReader
from uniseg_hub.weights import (
    Checkpoint,
    convert_state_dict,
    read_folder,
    read_official_checkpoint,
    save_folder,
)

from official_format import official_shapes, save_official_checkpoint, seeded_state_dict

SETTINGS = dict(deadline=5000, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=16)
"""Any JSON value (what ``json.loads`` can return)."""

small_ints = st.one_of(st.integers(-3, 400), st.sampled_from([0, 1, 2, 3, 1 << 31, 1 << 62, -(1 << 40)]))
"""Numbers near the valid sizes, and absurd ones."""


def _mutate(document, path_and_value):
    """``document`` with the value at ``path`` (keys / indices into nested objects) replaced, or deleted when the
    value is the sentinel ``...``; paths that do not exist leave it unchanged."""
    path, value = path_and_value
    out = copy.deepcopy(document)
    node = out
    for key in path[:-1]:
        if isinstance(node, dict) and key in node or isinstance(node, list) and isinstance(key, int) \
                and -len(node) <= key < len(node):
            node = node[key]
        else:
            return out
    last = path[-1]
    if isinstance(node, dict) and isinstance(last, str):
        if value is ...:
            node.pop(last, None)
        else:
            node[last] = value
    elif isinstance(node, list) and isinstance(last, int) and -len(node) <= last < len(node):
        node[last] = value if value is not ... else None
    return out


def _paths(document, prefix=()):
    """Every path into a JSON document (for mutations)."""
    yield prefix + ("__new__",)
    if isinstance(document, dict):
        for key, value in document.items():
            yield prefix + (key,)
            yield from _paths(value, prefix + (key,))
    elif isinstance(document, list):
        for i, value in enumerate(document):
            yield prefix + (i,)
            yield from _paths(value, prefix + (i,))




@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One folder for the files of all examples of this module (each example overwrites them)."""
    return tmp_path_factory.mktemp("properties")


# ----------------------------------------------------------------------------------------------- manifests

ENTRY = next(iter(packaged_manifest().models.values())).to_dict()
ENTRY_PATHS = list(_paths(ENTRY))


@settings(max_examples=60, **SETTINGS)
@given(st.tuples(st.sampled_from(ENTRY_PATHS), st.one_of(json_values, small_ints, st.just(...))))
def test_manifest_entry_mutations(change):
    entry = _mutate(ENTRY, change)
    try:
        manifest = parse_manifest({"schema_version": 1, "models": [entry]})
    except ManifestError:
        return
    assert isinstance(manifest, Manifest)
    (parsed,) = manifest.models.values()
    assert isinstance(parsed, ManifestEntry) and isinstance(parsed.architecture, UniSegConfig)
    assert ManifestEntry.from_dict(parsed.to_dict()) == parsed  # what parses, round-trips


@settings(max_examples=40, **SETTINGS)
@given(json_values)
def test_manifest_random_json(document):
    for data in (document, {"schema_version": 1, "models": document}, {"schema_version": 1, "models": [document]}):
        try:
            assert isinstance(parse_manifest(data), Manifest)
        except ManifestError:
            pass


@settings(max_examples=30, **SETTINGS)
@given(st.one_of(st.text(max_size=200), json_values.map(json.dumps),
                 st.integers(1, 50_000).map(lambda n: '{"models": ' + "[" * n + "]" * n + "}")))
def test_manifest_random_files(scratch, text):
    path = scratch / "manifest.json"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        assert isinstance(load_manifest(path), Manifest)
    except ManifestError:
        pass


# ----------------------------------------------------------------------------------------------- model configuration

CONFIG = UniSegConfig().to_dict()
CONFIG_PATHS = list(_paths(CONFIG))


def _check_config(document, where="config.json"):
    try:
        config = UniSegConfig.from_dict(document, where)
    except ConfigError:
        return None
    assert isinstance(config, UniSegConfig)
    assert config.parameter_estimate() <= MAX_PARAMETERS
    assert UniSegConfig.from_dict(config.to_dict()) == config
    return config


@settings(max_examples=80, **SETTINGS)
@given(st.tuples(st.sampled_from(CONFIG_PATHS), st.one_of(json_values, small_ints, st.just(...))))
def test_model_config_mutations(change):
    _check_config(_mutate(CONFIG, change))


@settings(max_examples=40, **SETTINGS)
@given(json_values, st.sampled_from(["UniSeg", "UniSegBackbone", None, 3]))
def test_model_config_random_json(document, architecture):
    _check_config(document)
    _check_config({"architecture": architecture, "config": document})


@settings(max_examples=30, **SETTINGS)
@given(st.one_of(st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode()),
                 st.tuples(st.sampled_from(CONFIG_PATHS), json_values).map(
                     lambda c: json.dumps(_mutate(CONFIG, c)).encode())))
def test_config_json_files(scratch, data):
    """A folder whose config.json is random: its architecture is read (without the weights) or refused."""
    folder = scratch / "config-only"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_bytes(data)
    try:
        checkpoint = read_folder(folder, tensors=False)
    except UnisegHubError:
        return
    assert isinstance(checkpoint, Checkpoint) and isinstance(checkpoint.config, UniSegConfig)


# ----------------------------------------------------------------------------------------------- checkpoint bytes

TINY = dict(base_features=2, max_features=4, num_tasks=2, patch_zyx=(32, 64, 64))


@pytest.fixture(scope="module")
def official_bytes(scratch):
    path = scratch / "official.model"
    save_official_checkpoint(path, seeded_state_dict(official_shapes(**TINY), seed=5))
    return path.read_bytes()


@pytest.fixture(scope="module")
def safetensors_bytes(scratch, official_bytes):
    path = scratch / "source.model"
    path.write_bytes(official_bytes)
    state, config = convert_state_dict(read_official_checkpoint(path))
    return (save_folder(scratch / "converted", state, config, overwrite=True) / "model.safetensors").read_bytes()


damage = st.one_of(
    st.tuples(st.just("cut"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=8)),
    st.tuples(st.just("head"), st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), min_size=1,
                                        max_size=8)),
)
"""A damage to a file: cut at a fraction of its length, bytes set at random places, or bytes set near its start
(where the headers are)."""


def _damaged(data: bytes, how) -> bytes:
    kind, what = how
    if kind == "cut":
        return data[: int(len(data) * what)]
    out = bytearray(data)
    for where, value in what:
        index = int(where * (len(out) - 1)) if kind == "flip" else min(where, len(out) - 1)
        out[index] = value
    return bytes(out)


def _official_outcome(scratch: Path, data: bytes):
    path = scratch / "fuzz.model"
    path.write_bytes(data)
    try:
        state, config = convert_state_dict(read_official_checkpoint(path))
    except UnisegHubError:
        return None
    assert isinstance(config, UniSegConfig)
    assert all(isinstance(k, str) and v.dtype == torch.float32 and torch.isfinite(v).all() for k, v in state.items())
    return config


@settings(max_examples=30, **SETTINGS)
@given(st.binary(max_size=2000))
def test_official_reader_random_bytes(scratch, data):
    _official_outcome(scratch, data)


@settings(max_examples=40, **SETTINGS)
@given(damage)
def test_official_reader_damaged_file(scratch, official_bytes, how):
    _official_outcome(scratch, _damaged(official_bytes, how))


def _safetensors_outcome(scratch: Path, data: bytes):
    path = scratch / "fuzz.safetensors"
    path.write_bytes(data)
    try:
        checkpoint = read_folder(path)
    except UnisegHubError:
        return None
    assert isinstance(checkpoint.config, UniSegConfig)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in checkpoint.state.values())
    return checkpoint


@settings(max_examples=30, **SETTINGS)
@given(st.one_of(st.binary(max_size=2000), st.binary(max_size=300).map(
    lambda b: len(b).to_bytes(8, "little") + b)))
def test_safetensors_reader_random_bytes(scratch, data):
    _safetensors_outcome(scratch, data)


@settings(max_examples=40, **SETTINGS)
@given(damage)
def test_safetensors_reader_damaged_file(scratch, safetensors_bytes, how):
    _safetensors_outcome(scratch, _damaged(safetensors_bytes, how))


def test_the_undamaged_files_read(scratch, official_bytes, safetensors_bytes):
    assert _official_outcome(scratch, official_bytes) is not None
    assert _safetensors_outcome(scratch, safetensors_bytes) is not None


# ----------------------------------------------------------------------------------------------- NIfTI


def _nifti_bytes() -> bytes:
    data = np.random.default_rng(1).normal(100, 30, size=(10, 9, 6)).astype(np.float32)
    return nib.Nifti1Image(data, np.diag([0.8, 0.9, 2.5, 1.0])).to_bytes()


NIFTI = _nifti_bytes()
READ = Compose([CheckInputFilesd("image"), LoadImaged("image", reader=CaseReader(), image_only=True),
                EnsureChannelFirstd("image"), CheckImaged("image", channels=1, pixdim=(1.5, 1.5, 3.0))])
"""The reading half of the bundle's preprocessing: file checks, the nibabel reader, the image checks."""


def _nifti_outcome(scratch: Path, data: bytes, compressed: bool):
    path = scratch / ("fuzz.nii.gz" if compressed else "fuzz.nii")
    path.write_bytes(gzip.compress(data, compresslevel=1) if compressed else data)
    try:
        image = READ({"image": str(path)})["image"]
    except Exception as e:  # MONAI wraps what a transform raises in RuntimeErrors: ours must be inside
        if isinstance(e, UnisegHubError) or isinstance(unwrap_error(e), UnisegHubError):
            return None
        raise
    assert isinstance(image, MetaTensor) and image.ndim == 4
    return image


@settings(max_examples=25, **SETTINGS)
@given(st.binary(max_size=600), st.booleans())
def test_nifti_reader_random_bytes(scratch, data, compressed):
    _nifti_outcome(scratch, data, compressed)


@settings(max_examples=50, **SETTINGS)
@given(damage, st.booleans())
def test_nifti_reader_damaged_file(scratch, how, compressed):
    if how[0] == "flip":  # the voxels are most of the file: damage the 352-byte header instead
        how = ("head", [(int(w * 351), v) for w, v in how[1]])
    assume(how[0] != "cut" or how[1] < 1)
    _nifti_outcome(scratch, _damaged(NIFTI, how), compressed)


def test_the_undamaged_nifti_reads(scratch):
    assert tuple(_nifti_outcome(scratch, NIFTI, True).shape) == (1, 10, 9, 6)
