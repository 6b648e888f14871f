"""The frozen configuration objects (``uniseg_hub.config``): ``UniSegConfig`` and ``ManifestEntry`` take any JSON and
either give a valid object or refuse it with their own error, naming the field, before anything is allocated."""

import copy
import dataclasses
import json
import math
import subprocess
import sys
import traceback
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uniseg_hub.config import (
    MAX_PARAMETERS,
    FrozenMap,
    License,
    ManifestEntry,
    UniSegConfig,
    freeze,
    thaw,
)
from uniseg_hub.errors import ConfigError, ManifestError

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = json.loads((ROOT / "weights_manifest.json").read_text())["models"][0]
ARCH_FIELDS = [f.name for f in dataclasses.fields(UniSegConfig) if f.name != "architecture"]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ----------------------------------------------------------------------------------------------- strategies

scalars = (st.none() | st.booleans() | st.integers(-(2 ** 40), 2 ** 70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=5), max_leaves=25)
"""Anything ``json.loads`` can return (it reads NaN and Infinity too)."""

ints = (st.integers(-3, 12) | st.integers(1, 10 ** 12) | st.booleans() | st.sampled_from([1e9, 3.0, "3", None]))
triples = st.lists(ints, max_size=4)
field_values = (ints | st.lists(ints, max_size=60) | st.lists(triples, max_size=12)
                | st.lists(st.integers(1, 8), min_size=3, max_size=3) | json_values)
architectures = st.sampled_from(["UniSeg", "UniSegBackbone"]) | json_values


@st.composite
def valid_configs(draw):
    """Small architectures that must be accepted (mixed with bad values by the other strategies)."""
    stages = draw(st.integers(2, 6))
    strides = [[1, 1, 1]] + [draw(st.lists(st.integers(1, 2), min_size=3, max_size=3)) for _ in range(stages - 1)]
    total = [math.prod(s[a] for s in strides) for a in range(3)]
    config = {"in_channels": draw(st.lists(st.integers(1, 8), min_size=1, max_size=3, unique=True)),
              "features": draw(st.lists(st.integers(1, 64), min_size=stages, max_size=stages)),
              "kernel_sizes": [draw(st.lists(st.integers(1, 5), min_size=3, max_size=3)) for _ in range(stages)],
              "strides": strides}
    if draw(st.booleans()):
        config.update(num_tasks=draw(st.integers(1, 20)), head_channels=draw(st.integers(1, 8)),
                      patch_size=[t * draw(st.integers(1, 4)) for t in total])
        return {"architecture": "UniSeg", "config": config}
    return {"architecture": "UniSegBackbone", "config": {**config, "num_classes": draw(st.integers(1, 30))}}


@st.composite
def damaged_configs(draw):
    """A valid architecture with fields replaced, added or removed."""
    data = draw(valid_configs() | st.just(copy.deepcopy(OFFICIAL["architecture"])))
    config = data["config"]
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(ARCH_FIELDS + ["extra"]))
        if draw(st.integers(0, 4)) == 0:
            config.pop(key, None)
        else:
            config[key] = draw(field_values)
    if draw(st.integers(0, 5)) == 0:
        data["architecture"] = draw(architectures)
    return data


any_configs = (json_values | st.fixed_dictionaries({"architecture": architectures,
                                                   "config": st.dictionaries(st.sampled_from(ARCH_FIELDS + ["x"]),
                                                                             field_values, max_size=9)})
               | valid_configs() | damaged_configs())


def _published_entry() -> dict:
    return {**copy.deepcopy(OFFICIAL), "published": True, "repo_id": "org/uniseg-11task", "revision": "a" * 40,
            "sha256": "b" * 64, "size": 123}


@st.composite
def damaged_entries(draw):
    """The shipped entry (or a published variant) with a field, or a field of a nested object, changed."""
    entry = draw(st.sampled_from([OFFICIAL, _published_entry()]))
    entry = copy.deepcopy(entry)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from([(), (), ("license",), ("source",), ("preprocessing",), ("architecture",),
                                     ("architecture", "config")]))
        where = entry
        for step in path:  # an earlier change may have replaced the object on the way
            where = where.get(step) if isinstance(where, dict) else None
        if not isinstance(where, dict):
            continue
        key = draw(st.sampled_from(sorted(where) + ["notes", "unknown"]))
        if draw(st.integers(0, 5)) == 0:
            where.pop(key, None)
        elif path == ("architecture", "config"):
            where[key] = draw(field_values)
        else:
            where[key] = draw(json_values | st.sampled_from([None, "", "a" * 40, "b" * 64, "org/x", True, 0, 1]))
    return entry


any_entries = json_values | damaged_entries() | st.sampled_from([OFFICIAL, _published_entry()])


# ------------------------------------------------------------------------------------- anything in, one outcome


@SETTINGS
@given(any_configs)
def test_any_json_gives_a_config_or_a_config_error(data):
    try:
        config = UniSegConfig.from_dict(data, "the test configuration")
    except ConfigError as e:
        assert str(e).startswith("the test configuration") and "\n" not in str(e)
        return
    assert config.architecture in ("UniSeg", "UniSegBackbone") and config.parameter_estimate() <= MAX_PARAMETERS
    back = json.loads(json.dumps(config.to_dict(), allow_nan=False))
    assert UniSegConfig.from_dict(back) == config and hash(config) == hash(UniSegConfig.from_dict(back))


@SETTINGS
@given(valid_configs())
def test_valid_architectures_are_accepted_and_round_trip(data):
    config = UniSegConfig.from_dict(data)
    assert config.to_dict() == data and UniSegConfig.from_dict(config.to_dict()) == config


@SETTINGS
@given(any_entries)
def test_any_json_gives_a_manifest_entry_or_a_manifest_error(data):
    try:
        entry = ManifestEntry.from_dict(data, "models[0]")
    except ManifestError as e:
        assert str(e).startswith("models[0]") and "\n" not in str(e)
        return
    text = json.dumps(entry.to_dict(), allow_nan=False)
    assert ManifestEntry.from_dict(json.loads(text)) == entry and hash(entry) is not None
    assert isinstance(entry.architecture, UniSegConfig) and isinstance(entry.license, License)
    assert isinstance(entry.preprocessing, FrozenMap) and isinstance(entry.source, FrozenMap)
    assert entry.to_dict().keys() == data.keys()


# -------------------------------------------------------------------------- damaged sizes: refused, not built

ABSURD = [
    ({"features": [100000, 64, 128, 256, 320, 320]}, "features[0] must be a whole number from 1 to 4096"),
    ({"patch_size": [10 ** 9, 192, 64]}, "patch_size[0] must be a whole number from 1 to"),
    ({"patch_size": [1e9, 192, 64]}, "patch_size[0] must be a whole number"),
    ({"patch_size": [4096, 4096, 4096]}, "patch_size [4096, 4096, 4096] must be divisible"),
    ({"features": [32] * 50, "kernel_sizes": [[3, 3, 3]] * 50, "strides": [[1, 1, 1]] * 50},
     "features must list 2 to 8 stages, got 50"),
    ({"num_tasks": True}, "num_tasks must be a whole number from 1 to 1024, got True"),
    ({"head_channels": "4"}, "head_channels must be a whole number"),
    ({"features": "32,64,128"}, "features must be a list of whole numbers"),
    ({"in_channels": [1, 1]}, "in_channels must list distinct channel counts"),
    ({"kernel_sizes": [[3, 3, 3]] * 5}, "kernel_sizes must be a list of 6 (x, y, z) triples"),
    ({"strides": [[1, 1, 1]] + [[2, 2, True]] * 5}, "strides[1][2] must be a whole number"),
    ({"strides": [[2, 2, 2]] * 6}, "strides[0] must be [1, 1, 1]"),
    ({"features": [4096] * 8, "kernel_sizes": [[7, 7, 7]] * 8, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 7,
      "patch_size": [128, 128, 128]}, "parameters, more than the 500,000,000"),
    ({"num_classes": 3}, "unknown UniSeg field(s) num_classes"),
    ({"width": 3}, "unknown UniSeg field(s) width"),
]


def _damaged(changes: dict) -> dict:
    return {"architecture": "UniSeg", "config": {**OFFICIAL["architecture"]["config"], **changes}}


@pytest.mark.parametrize("changes, message", ABSURD, ids=[m.split(" ")[0] for _, m in ABSURD])
def test_absurd_sizes_are_refused_by_the_dataclass_before_any_allocation(changes, message):
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError) as caught:
            UniSegConfig.from_dict(_damaged(changes), "config.json")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert message in str(caught.value) and str(caught.value).startswith("config.json")
    assert peak < 1 << 20, f"{peak} bytes allocated to refuse it"
    frames = {Path(f.filename).name for f in traceback.extract_tb(caught.value.__traceback__)}
    assert frames <= {"config.py", "test_config.py", "raises.py", "python_api.py"}, frames  # not torch


def test_absurd_sizes_are_refused_without_torch():
    """In a fresh interpreter: every damaged architecture is refused, and torch was never imported."""
    code = ("import json, sys\nfrom uniseg_hub.config import UniSegConfig, ManifestEntry\n"
            "from uniseg_hub.errors import ConfigError, ManifestError\n"
            f"cases = json.loads({json.dumps(json.dumps([_damaged(c) for c, _ in ABSURD]))})\n"
            f"official = json.loads({json.dumps(json.dumps(OFFICIAL))})\n"
            "for case in cases:\n"
            "    try:\n        UniSegConfig.from_dict(case)\n    except ConfigError:\n        pass\n"
            "    else:\n        raise SystemExit('accepted')\n"
            "    try:\n        ManifestEntry.from_dict({**official, 'architecture': case})\n"
            "    except ManifestError:\n        pass\n    else:\n        raise SystemExit('accepted')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("changes, message", ABSURD[:6])
def test_a_damaged_config_json_is_refused_before_the_tensors_or_the_network(tmp_path, changes, message):
    from uniseg_hub import load_model
    from uniseg_hub.weights import read_folder

    (tmp_path / "model.safetensors").write_bytes(b"\0" * 64)  # never read: the architecture is refused first
    (tmp_path / "config.json").write_text(json.dumps(_damaged(changes)))
    for load in (read_folder, load_model):
        tracemalloc.start()
        try:
            with pytest.raises(ConfigError, match="config.json") as caught:
                load(tmp_path)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert message in str(caught.value) and peak < 4 << 20


@pytest.mark.parametrize("changes, message", ABSURD[:4])
def test_a_manifest_entry_with_a_damaged_architecture_names_entry_and_field(changes, message):
    with pytest.raises(ManifestError) as caught:
        ManifestEntry.from_dict({**OFFICIAL, "architecture": _damaged(changes)}, "models[0]")
    assert str(caught.value).startswith("models[0] (uniseg-11task): architecture: ") and message in str(caught.value)


# ------------------------------------------------------------------------------------------- the entry object


def test_the_entry_is_frozen_typed_and_gives_its_json_back():
    entry = ManifestEntry.from_dict(OFFICIAL)
    assert entry.to_dict() == OFFICIAL and json.dumps(entry.to_dict()) == json.dumps(OFFICIAL)
    assert entry.architecture == UniSegConfig() and entry.license.commercial_use is False
    assert entry.license.commercial_contact == OFFICIAL["license"]["commercial_contact"]
    assert entry.source["code_commit"] == OFFICIAL["source"]["code_commit"] and entry.notes == OFFICIAL["notes"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.license.url = "https://example.org"
    with pytest.raises(TypeError):
        entry.source["paper"] = "another"
    with pytest.raises(AttributeError):
        entry.source.update  # noqa: B018  a Mapping, not a dict
    assert entry.to_dict() is not entry.to_dict()  # the JSON form is a fresh copy to change
    changed = entry.to_dict()
    changed["preprocessing"]["tasks"]["liver"]["spacing"][0] = 9.0
    assert entry.preprocessing["tasks"]["liver"]["spacing"][0] == 1.5


def test_direct_construction_and_replace_run_the_same_checks():
    entry = ManifestEntry(name="m", description="d", published=True, repo_id="org/m", revision="c" * 40,
                          sha256="d" * 64, size=10, filename="model.safetensors", license=OFFICIAL["license"],
                          architecture=UniSegConfig(), preprocessing={"axis_order": "MONAI"},
                          source=OFFICIAL["source"], notes="n")
    assert isinstance(entry.license, License) and isinstance(entry.preprocessing, FrozenMap)
    assert ManifestEntry.from_dict(entry.to_dict()) == entry and entry.to_dict()["notes"] == "n"
    with pytest.raises(ManifestError, match=r"^entry \(m\): revision 'main' must be a 40-hex commit"):
        dataclasses.replace(entry, revision="main")
    with pytest.raises(ManifestError, match="filename '../x.safetensors'"):
        dataclasses.replace(entry, filename="../x.safetensors")
    with pytest.raises(ManifestError, match="preprocessing must be a JSON object"):
        dataclasses.replace(entry, preprocessing={"axis_order": "MONAI", 3: "int key"})
    with pytest.raises(ManifestError, match="license must hold"):
        License(id="x", name="x", url="not a url", commercial_use=False)


def test_frozen_maps_hash_compare_and_pickle_like_values():
    import pickle

    data = {"a": [1, {"b": [2, 3]}], "c": None}
    frozen = freeze(data)
    assert isinstance(frozen, FrozenMap) and frozen["a"][1]["b"] == (2, 3) and thaw(frozen) == data
    assert frozen == freeze(copy.deepcopy(data)) and hash(frozen) == hash(freeze(data))
    assert pickle.loads(pickle.dumps(frozen)) == frozen and copy.deepcopy(frozen) == frozen
    assert FrozenMap({"x": 1}) == {"x": 1} and repr(FrozenMap({"x": 1})) == "FrozenMap({'x': 1})"


def test_task_all_with_probabilities_is_refused_with_a_reason(capsys):
    from uniseg_hub.cli import main
    from uniseg_hub.config import PredictOptions
    from uniseg_hub.pipeline import MergeTasksd
    from uniseg_hub.tasks import tasks_in_group

    with pytest.raises(ConfigError, match="no probability map belongs to it; run the tasks one by one"):
        PredictOptions(task="all", probabilities=True)
    assert PredictOptions(task="liver", probabilities=True).probabilities  # one task: its own probabilities
    with pytest.raises(ConfigError, match="probabilities are not written for task all"):
        MergeTasksd("pred", tasks_in_group("CT"), probabilities=True)  # the bundle refuses it too
    MergeTasksd("pred", tasks_in_group("CT")[:1], probabilities=True)
    with pytest.raises(SystemExit) as exit_:
        main(["predict", "scan.nii.gz", "--task", "all", "--probabilities"])
    assert exit_.value.code == 2 and "run the tasks one by one" in capsys.readouterr().err
