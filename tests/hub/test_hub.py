"""Manifest, verified downloads, cache and offline behaviour, through the real huggingface_hub client and a fake Hub
on 127.0.0.1 (tests/fakehub.py)."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants, scan_cache_dir
from huggingface_hub import errors as hf_errors

from uniseg_hub import (
    ChecksumError,
    DownloadError,
    IncompatibleCheckpointError,
    ManifestError,
    NotAvailableOfflineError,
    NotPublishedError,
    UnisegHubError,
    UnknownModelError,
    download,
    hub,
    list_models,
    load_encoder,
    load_model,
    model_info,
    verify,
)
from uniseg_hub.config import ARCHITECTURES as ARCHITECTURE_NAMES
from uniseg_hub.config import License, ManifestEntry, UniSegConfig
from uniseg_hub.files import format_json, sha256_file
from uniseg_hub.hub import manifest_entry
from uniseg_hub.tasks import get_task
from uniseg_hub.weights import ARCHITECTURES, infer_architecture, read_folder

from official_format import official_shapes

pytest.register_assert_rewrite("fakehub")  # imported here before pytest loads it as a plugin

from fakehub import Fault, cli_env, manifest_with, serve  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
NAME = "uniseg-small"


def cdn_gets(fake) -> int:
    return len(fake.requests("cdn", "GET"))


def blob_files(cache: Path) -> list[Path]:
    return sorted((cache / "models--test-org--uniseg-small" / "blobs").glob("*"))


# ------------------------------------------------------------------------------------------------ the manifest


def test_shipped_manifest_is_valid_identical_to_the_top_level_one_and_honest():
    top, packaged = ROOT / "weights_manifest.json", ROOT / "uniseg_hub" / "weights_manifest.json"
    assert top.read_bytes() == packaged.read_bytes(), \
        "weights_manifest.json and uniseg_hub/weights_manifest.json differ: edit the top-level file, then " \
        "`cp weights_manifest.json uniseg_hub/weights_manifest.json`"
    assert Path(hub.load_manifest().path).read_bytes() == top.read_bytes() and list_models() == ["uniseg-11task"]
    official = manifest_entry("uniseg-11task")
    assert model_info("uniseg-11task") == official.to_dict()  # the public dict form, as documented in README.md
    assert model_info("uniseg-11task")["preprocessing"]["tasks"]["liver"]["spacing"] == list(get_task("liver").spacing)
    assert isinstance(official, ManifestEntry) and isinstance(official.license, License)
    # nothing invented: the official model is not on the Hub, so every pinned field is null
    assert official.published is False
    assert [official.repo_id, official.revision, official.sha256, official.size] == [None] * 4
    assert official.source["original_sha256"] is None
    assert official.source["original_url"].startswith("https://drive.google.com/")
    assert official.license.commercial_use is False and "non-commercial" in official.license.name
    # the architecture is what `convert` infers from the official tensor shapes
    shapes = {k: torch.empty(s, device="meta") for k, s in official_shapes().items()}
    assert isinstance(official.architecture, UniSegConfig) and official.architecture == infer_architecture(shapes)
    # the preprocessing is the task table's, not a copy that could drift
    assert official.preprocessing.to_dict() == hub.official_preprocessing(official.architecture.patch_size)
    assert official.preprocessing["tasks"]["autopet"]["spacing"] == (4.0, 4.0, 8.0)
    assert ARCHITECTURE_NAMES == tuple(ARCHITECTURES)


def test_shipped_manifest_round_trips_byte_for_byte_through_its_entries():
    text = (ROOT / "weights_manifest.json").read_text(encoding="utf-8")
    data = json.loads(text)
    entries = [ManifestEntry.from_dict(e, f"models[{i}]") for i, e in enumerate(data["models"])]
    assert [e.to_dict() for e in entries] == data["models"]
    assert format_json({**data, "models": [e.to_dict() for e in entries]}) + "\n" == text
    assert list(hub.load_manifest().models.values()) == entries
    # frozen all the way down, and re-checked when changed
    entry = entries[0]
    with pytest.raises(AttributeError):
        entry.name = "other"
    with pytest.raises(TypeError):
        entry.preprocessing["axis_order"] = "zyx"
    assert isinstance(entry.preprocessing["tasks"]["liver"]["spacing"], tuple) and hash(entry)
    with pytest.raises(ManifestError, match=r"entry \(uniseg-11task\): an unpublished entry has no sha256"):
        dataclasses.replace(entry, sha256="b" * 64)
    published = dataclasses.replace(entry, published=True, repo_id="org/x", revision=None, sha256="b" * 64, size=1,
                                    require_revision=False)
    assert published.to_dict()["revision"] is None
    with pytest.raises(ManifestError, match="revision None must be a 40-hex commit"):
        ManifestEntry.from_dict(published.to_dict())


def _official_manifest() -> dict:
    return json.loads((ROOT / "weights_manifest.json").read_text())


def _published(**changes) -> dict:
    entry = {**_official_manifest()["models"][0], "published": True, "repo_id": "org/uniseg-11task",
             "revision": "a" * 40, "sha256": "b" * 64, "size": 123}
    return {**entry, **changes}


@pytest.mark.parametrize("entry, message", [
    (_published(revision="main"), "revision 'main' must be a 40-hex commit"),
    (_published(sha256="abc"), "sha256 'abc' must be 64"),
    (_published(size=0), "size 0 must be"),
    (_published(repo_id="no-slash"), "must be ORG/NAME"),
    (_published(repo_id=None), "repo_id None must be ORG/NAME"),
    (_published(format="pt"), "format 'pt' is not supported"),
    (_published(filename="model.bin"), "relative path to a .safetensors"),
    (_published(sha265="x"), "unknown field(s) sha265"),
    ({**_official_manifest()["models"][0], "repo_id": "org/made-up"}, "an unpublished entry has no repo_id"),
    ({k: v for k, v in _published().items() if k != "license"}, "missing field(s) license"),
    (_published(name="Bad Name"), "name 'Bad Name'"),
    (_published(architecture={"architecture": "ResNet", "config": {}}), "one of UniSeg, UniSegBackbone, got 'ResNet'"),
    (_published(architecture={"architecture": "UniSeg", "config": {"features": [100000] * 6}}),
     "architecture: features[0] must be a whole number from 1 to 4096"),
    (_published(architecture={"architecture": "UniSeg"}), "architecture must be {\"architecture\""),
    (_published(license={"id": "x", "name": "x", "url": "ftp://x", "commercial_use": False}), "license must hold"),
    (_published(license={**_official_manifest()["models"][0]["license"], "commercial_contact": 3}),
     "license.commercial_contact must be a string"),
    (_published(preprocessing={"axis_order": "x", "bad": float("nan")}), "preprocessing must be a JSON object"),
    (_published(source={**_official_manifest()["models"][0]["source"], "code_commit": "main"}), "code_commit"),
    (_published(notes=None), "notes must be a string"),
    (_published(published="yes"), "published must be true or false"),
    (_published(size=True), "size True must be"),
])
def test_manifest_validation_names_the_field(tmp_path, entry, message):
    path = manifest_with(tmp_path / "m.json", entry)
    with pytest.raises(ManifestError, match="m.json") as caught:
        hub.load_manifest(path)
    assert message in str(caught.value)


def test_manifest_file_level_errors(tmp_path):
    entry = _published()
    manifest_with(tmp_path / "dup.json", entry, entry)
    with pytest.raises(ManifestError, match="used twice"):
        hub.load_manifest(tmp_path / "dup.json")
    (tmp_path / "key.json").write_text('{"schema_version": 1, "schema_version": 1, "models": []}')
    with pytest.raises(ManifestError, match="duplicate key"):
        hub.load_manifest(tmp_path / "key.json")
    (tmp_path / "v2.json").write_text('{"schema_version": 2, "models": []}')
    with pytest.raises(ManifestError, match="upgrade uniseg-hub"):
        hub.load_manifest(tmp_path / "v2.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ManifestError, match="not valid JSON"):
        hub.load_manifest(tmp_path / "bad.json")
    with pytest.raises(ManifestError, match="cannot read"):
        hub.load_manifest(tmp_path / "missing.json")


def test_another_manifest_by_environment_or_argument(tmp_path, monkeypatch):
    path = manifest_with(tmp_path / "mirror.json", _published(name="mirrored"), endpoint="http://mirror.invalid")
    assert list_models(manifest=path) == ["mirrored"] and hub.load_manifest(path).endpoint == "http://mirror.invalid"
    assert list_models(manifest=json.loads(path.read_text())) == ["mirrored"]
    monkeypatch.setenv("UNISEG_HUB_MANIFEST", str(path))
    assert list_models() == ["mirrored"]
    with pytest.raises(UnknownModelError, match=r"unknown model 'uniseg-11task'.*lists: mirrored"):
        model_info("uniseg-11task")
    monkeypatch.setenv("UNISEG_HUB_MANIFEST", str(tmp_path / "absent.json"))
    with pytest.raises(ManifestError, match="from UNISEG_HUB_MANIFEST"):
        list_models()


# ------------------------------------------------------------------------------------------ names and errors


def test_unpublished_official_model_says_how_to_get_it_and_builds_without_weights(converted_small, tmp_path,
                                                                                  monkeypatch):
    no_upstream = _official_manifest()
    del no_upstream["models"][0]["upstream"]
    for load in (lambda: load_encoder("uniseg-11task", manifest=no_upstream),
                 lambda: download("uniseg-11task", manifest=no_upstream)):
        with pytest.raises(NotPublishedError) as caught:
            load()
        message = str(caught.value)
        assert "uniseg-hub convert" in message and "uniseg-hub publish" in message
        assert "drive.google.com" in message and isinstance(caught.value, UnisegHubError)
    # the shipped entry names its Drive file (tests/hub/test_upstream.py fetches such files); offline it says so
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("UNISEG_HUB_CACHE", str(tmp_path / "cache"))
    for load in (lambda: load_encoder("uniseg-11task"), lambda: download("uniseg-11task")):
        with pytest.raises(NotAvailableOfflineError, match="drive.google.com.*uniseg-hub convert"):
            load()
    encoder = load_encoder("uniseg-11task", pretrained=False, in_channels=2)
    assert encoder.feature_info.channels() == [32, 64, 128, 256, 320, 320]
    assert encoder.pretrained_cfg["license"]["commercial_use"] is False
    assert encoder.pretrained_cfg["preprocessing"]["patch_size"] == [192, 192, 64]
    assert not encoder.load_report.loaded
    # a local copy for the unpublished entry has no sha256 to match, but it must still fit the architecture
    with pytest.raises(IncompatibleCheckpointError, match="wrong shape"):
        load_encoder("uniseg-11task", weights_path=converted_small / "model.safetensors")


def test_unknown_names_list_the_models():
    with pytest.raises(UnknownModelError, match=r"'uniseg-11tsk'.*lists: uniseg-11task.*no file or folder"):
        load_model("uniseg-11tsk")
    with pytest.raises(UnknownModelError, match="uniseg-11task"):
        download("nope")


# ------------------------------------------------------------------------------------------------ downloads


def test_first_download_then_cached_loads_make_no_request(
        fake_hub, hf_isolated, small_release, converted_small, tmp_path):
    manifest, entry = serve(fake_hub, small_release, tmp_path / "m.json")
    encoder = load_encoder(NAME, manifest=manifest)
    first = fake_hub.requests()
    assert [(r.server, r.method) for r in first] == [("hub", "HEAD"), ("cdn", "GET")]
    assert f"/test-org/uniseg-small/resolve/{entry['revision']}/model.safetensors" in first[0].path
    assert first[0].headers["user-agent"].startswith("uniseg-hub/0.1.0;")
    source = read_folder(converted_small).state
    assert all(torch.equal(v, source[f"encoder.{k}"]) for k, v in encoder.state_dict().items()
               if not k.startswith("stages.0.0.convs."))
    assert encoder.pretrained_cfg["sha256"] == entry["sha256"] and encoder.pretrained_cfg["weights"]
    fake_hub.clear_log()
    model = load_model(NAME, manifest=manifest)
    load_encoder(NAME, manifest=manifest, in_channels=4)
    load_model(NAME, manifest=manifest, pretrained=False)
    assert fake_hub.requests() == []
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())
    assert scan_cache_dir(hf_isolated).warnings == []  # our marker does not upset `hf cache`
    assert hub.cache_status(NAME, manifest=manifest) == {"path": str(download(NAME, manifest=manifest)),
                                                         "verified": True}


def test_offline_with_a_warm_and_an_empty_cache(fake_hub, hf_isolated, small_release, tmp_path, monkeypatch):
    manifest, _ = serve(fake_hub, small_release, tmp_path / "m.json")
    warm = download(NAME, manifest=manifest)
    fake_hub.clear_log()
    assert download(NAME, manifest=manifest, local_files_only=True) == warm
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert download(NAME, manifest=manifest) == warm
    assert load_encoder(NAME, manifest=manifest).load_report.loaded
    empty = tmp_path / "empty-cache"
    with pytest.raises(NotAvailableOfflineError) as caught:
        load_model(NAME, manifest=manifest, cache_dir=empty)
    message = str(caught.value)
    assert NAME in message and str(empty) in message and f"uniseg-hub download {NAME}" in message
    assert "HF_HUB_OFFLINE=1" in message
    assert isinstance(caught.value.__cause__, hf_errors.LocalEntryNotFoundError)
    with pytest.raises(NotAvailableOfflineError, match="force"):
        download(NAME, manifest=manifest, force=True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(NotAvailableOfflineError, match="local_files_only"):
        download(NAME, manifest=manifest, cache_dir=empty, local_files_only=True)
    assert fake_hub.requests() == []


def test_a_corrupted_download_is_removed_and_fetched_once_more(fake_hub, hf_isolated, small_release, tmp_path):
    manifest, entry = serve(fake_hub, small_release, tmp_path / "m.json")
    fake_hub.faults[entry["sha256"]] = Fault("corrupt", times=1)
    path = download(NAME, manifest=manifest)
    assert cdn_gets(fake_hub) == 2 and sha256_file(path) == entry["sha256"]
    fake_hub.faults[entry["sha256"]] = Fault("corrupt", times=None)
    with pytest.raises(ChecksumError, match="again after fetching it a second time") as caught:
        download(NAME, manifest=manifest, force=True)
    assert caught.value.expected == entry["sha256"]
    assert blob_files(hf_isolated) == [] and not path.exists()  # nothing corrupt stays behind
    del fake_hub.faults[entry["sha256"]]
    assert sha256_file(download(NAME, manifest=manifest)) == entry["sha256"]


def test_a_corrupted_cached_file_is_caught(fake_hub, hf_isolated, small_release, tmp_path, monkeypatch):
    manifest, entry = serve(fake_hub, small_release, tmp_path / "m.json")
    path = download(NAME, manifest=manifest)
    blob = path.resolve()
    data = bytearray(blob.read_bytes())
    data[-10] ^= 1
    blob.write_bytes(bytes(data))  # same size, new mtime: the marker no longer vouches for it
    fake_hub.clear_log()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ChecksumError, match="it was removed from the cache.*uniseg-hub download uniseg-small"):
        download(NAME, manifest=manifest)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert sha256_file(download(NAME, manifest=manifest)) == entry["sha256"] and cdn_gets(fake_hub) == 1


def test_the_marker_spares_rehashing_and_verify_always_hashes(fake_hub, hf_isolated, small_release, tmp_path):
    manifest, entry = serve(fake_hub, small_release, tmp_path / "m.json")
    path = download(NAME, manifest=manifest)
    blob = path.resolve()
    stat = blob.stat()
    with open(blob, "r+b") as f:  # flip a byte in place and restore the mtime: path, size, mtime, inode unchanged
        f.seek(stat.st_size - 10)
        byte = f.read(1)
        f.seek(stat.st_size - 10)
        f.write(bytes([byte[0] ^ 1]))
    os.utime(blob, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert download(NAME, manifest=manifest) == path  # trusted: not hashed on every load
    with pytest.raises(ChecksumError, match=f"uniseg-hub download {NAME} --force") as caught:
        verify(NAME, manifest=manifest)
    assert caught.value.actual != entry["sha256"]
    fake_hub.clear_log()
    assert sha256_file(download(NAME, manifest=manifest)) == entry["sha256"]  # marker dropped: re-hashed
    assert cdn_gets(fake_hub) == 1 and verify(NAME, manifest=manifest) == path


def test_a_truncated_body_is_fetched_again_or_reported(fake_hub, hf_isolated, small_release, tmp_path):
    manifest, entry = serve(fake_hub, small_release, tmp_path / "m.json")
    fake_hub.faults[entry["sha256"]] = Fault("truncate", times=1)
    assert sha256_file(download(NAME, manifest=manifest)) == entry["sha256"] and cdn_gets(fake_hub) == 2
    fake_hub.faults[entry["sha256"]] = Fault("truncate", times=None)
    with pytest.raises(DownloadError, match="Consistency check failed") as caught:
        download(NAME, manifest=manifest, cache_dir=tmp_path / "other")
    assert not isinstance(caught.value, ChecksumError) and isinstance(caught.value.__cause__, OSError)
    blobs = tmp_path / "other" / "models--test-org--uniseg-small" / "blobs"
    assert not blobs.exists() or list(blobs.iterdir()) == []


def test_a_dropped_connection_resumes(fake_hub, hf_isolated, small_release, tmp_path):
    manifest, entry = serve(fake_hub, small_release, tmp_path / "m.json")
    fake_hub.faults[entry["sha256"]] = Fault("drop", times=1)
    assert sha256_file(download(NAME, manifest=manifest)) == entry["sha256"] and cdn_gets(fake_hub) == 2


def test_wrong_repository_revision_and_file_each_say_so(fake_hub, hf_isolated, small_release, tmp_path):
    cases = {
        "repo_id": ("test-org/missing", hf_errors.RepositoryNotFoundError, "repository test-org/missing"),
        "revision": ("f" * 40, hf_errors.RevisionNotFoundError, f"revision {'f' * 40} of test-org/uniseg-small"),
        "filename": ("weights.safetensors", hf_errors.RemoteEntryNotFoundError, "file weights.safetensors is not"),
    }
    messages = set()
    for field_, (value, cause, text) in cases.items():
        manifest, _ = serve(fake_hub, small_release, tmp_path / f"{field_}.json", **{field_: value})
        with pytest.raises(DownloadError) as caught:
            load_encoder(NAME, manifest=manifest)
        assert text in str(caught.value) and fake_hub.url in str(caught.value)
        assert isinstance(caught.value.__cause__, cause), caught.value.__cause__
        messages.add(str(caught.value).split(":")[0])
    assert len(messages) == 3


def test_another_revision_is_hashed_and_flagged(fake_hub, hf_isolated, small_release, tmp_path):
    manifest, entry = serve(fake_hub, small_release, tmp_path / "m.json")
    fake_hub.add_branch(entry["repo_id"], "same-weights", entry["revision"])
    assert sha256_file(download(NAME, revision="same-weights", manifest=manifest)) == entry["sha256"]
    fake_hub.commit(entry["repo_id"], {"model.safetensors": b"other weights"}, branch="retrained")
    with pytest.warns(UserWarning, match="not the checkpoint the manifest describes"):
        other = download(NAME, revision="retrained", manifest=manifest)
    assert other.read_bytes() == b"other weights"


def test_weights_path_is_checked_against_the_manifest(fake_hub, hf_isolated, small_release, converted_small,
                                                      tmp_path):
    manifest, _ = serve(fake_hub, small_release, tmp_path / "m.json")
    encoder = load_encoder(NAME, manifest=manifest, weights_path=converted_small / "model.safetensors")
    assert encoder.load_report.loaded and fake_hub.requests() == []
    (tmp_path / "other.safetensors").write_bytes(b"not it")
    with pytest.raises(ChecksumError, match="another checkpoint"):
        load_model(NAME, manifest=manifest, weights_path=tmp_path / "other.safetensors")
    with pytest.raises(UnisegHubError, match="manifest names"):
        load_model(converted_small, revision="main")


# --------------------------------------------------------------------------- processes: concurrency, interruption


def _download_script(manifest: Path, cache: Path) -> list[str]:
    return [sys.executable, "-c", f"from uniseg_hub import download; print(download('{NAME}', "
                                  f"manifest={str(manifest)!r}, cache_dir={str(cache)!r}))"]


def test_four_processes_downloading_at_once_end_with_one_verified_file(fake_hub, small_release, tmp_path):
    """Each process waits for the others through huggingface_hub's download lock and uniseg-hub's check lock."""
    manifest, entry = serve(fake_hub, small_release, tmp_path / "m.json")
    fake_hub.faults[entry["sha256"]] = Fault("stall", times=1, after=1000)  # hold the first download open
    cache = tmp_path / "shared-cache"
    procs = [subprocess.Popen(_download_script(manifest, cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=cli_env(None, tmp_path / "home")) for _ in range(4)]
    assert fake_hub.faults[entry["sha256"]].reached.wait(60)
    time.sleep(1.0)  # the others are now waiting on the download lock
    fake_hub.faults[entry["sha256"]].release.set()  # the stalled transfer dies; huggingface_hub resumes it
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err for _, err in outputs]
    paths = {out.strip() for out, _ in outputs}
    assert len(paths) == 1
    blobs = list((cache / "models--test-org--uniseg-small" / "blobs").iterdir())
    assert [b.name for b in blobs] == [entry["sha256"]] and sha256_file(blobs[0]) == entry["sha256"]
    markers = list((cache / "models--test-org--uniseg-small" / ".uniseg_hub").iterdir())
    assert [m.name for m in markers] == [f"{entry['sha256']}.verified.json"]
    assert len(fake_hub.requests("cdn", "GET")) == 2  # one transfer (plus its resume), not four


@pytest.mark.parametrize("cut", ["headers", "half", "all-but-one"])
def test_a_killed_download_leaves_nothing_that_is_accepted_unverified(
        fake_hub, hf_isolated, small_release, tmp_path, cut):
    manifest, entry = serve(fake_hub, small_release, tmp_path / "m.json")
    size = entry["size"]
    after = {"headers": 0, "half": size // 2, "all-but-one": size - 1}[cut]
    fault = fake_hub.faults[entry["sha256"]] = Fault("stall", times=1, after=after)
    cache = tmp_path / "cache"
    proc = subprocess.Popen(_download_script(manifest, cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=cli_env(None, tmp_path / "home"))
    assert fault.reached.wait(60)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    fault.release.set()
    repo = cache / "models--test-org--uniseg-small"
    assert not (repo / "snapshots").exists() or not any((repo / "snapshots").rglob("*.safetensors"))
    assert all(p.name.endswith(".incomplete") for p in (repo / "blobs").iterdir())
    fake_hub.clear_log()
    path = hub.download(NAME, manifest=manifest, cache_dir=cache)
    assert cdn_gets(fake_hub) == 1 and sha256_file(path) == entry["sha256"]


def test_a_file_placed_but_not_verified_is_hashed_before_use(fake_hub, hf_isolated, small_release, tmp_path):
    """The window between huggingface_hub placing a file and uniseg-hub verifying it: a process killed there
    leaves a file without a marker, which the next load hashes."""
    from huggingface_hub import hf_hub_download

    manifest, entry = serve(fake_hub, small_release, tmp_path / "m.json")
    fake_hub.faults[entry["sha256"]] = Fault("corrupt", times=1)
    placed = hf_hub_download(entry["repo_id"], entry["filename"], revision=entry["revision"],
                             endpoint=fake_hub.url)  # what download() runs first, here without the check after it
    assert sha256_file(placed) != entry["sha256"]  # huggingface_hub alone accepted a corrupt file
    model = load_model(NAME, manifest=manifest)
    assert cdn_gets(fake_hub) == 2 and sha256_file(placed) == entry["sha256"]
    assert model.load_report.loaded
