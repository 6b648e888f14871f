"""Hub repository ids wherever a model name or folder works (``ORG/NAME``, ``ORG/NAME@REVISION``), and a local
folder winning over a manifest name: against the fake Hub on 127.0.0.1, through the real huggingface_hub client."""

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

from uniseg_hub import ChecksumError, DownloadError, NotAvailableOfflineError, UnisegHubError, load_encoder, load_model
from uniseg_hub.hub import parse_repo_id
from uniseg_hub.weights import read_folder

from fakehub import Fault

REPO = "test-org/uniseg-small"


@pytest.fixture
def hub_repo(fake_hub, hf_isolated, small_release, monkeypatch):
    """The small converted model published on the fake Hub as REPO (two commits: the second one changes a
    tensor); HF_ENDPOINT points there. Returns (first commit, second commit)."""
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    folder, _ = small_release
    first = fake_hub.commit_folder(REPO, folder)
    fake_hub.commit("test-org/config-only", {"config.json": (folder / "config.json").read_bytes()})
    return first, fake_hub.commit(REPO, {"README.md": b"second commit\n"})


def equal_states(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("text, parsed", [
    ("org/name", ("org/name", None)), ("org/name@main", ("org/name", "main")), ("o.x/n-1@v1.0", ("o.x/n-1", "v1.0")),
    ("uniseg-11task", None), ("./org/name", None), ("/abs/path", None), ("org/name@", None), ("a/b/c", None),
    ("org/name.safetensors", ("org/name.safetensors", None))])
def test_repository_ids_are_recognised(text, parsed):
    assert parse_repo_id(text) == parsed


def test_a_hub_repository_loads_by_its_id_and_then_offline(hub_repo, fake_hub, converted_small, monkeypatch):
    first, second = hub_repo
    expected = read_folder(converted_small).state
    model = load_model(REPO)
    assert equal_states(model.state_dict(), expected)
    assert model.pretrained_cfg["repo_id"] == REPO and model.pretrained_cfg["revision"] == second
    pinned = load_encoder(f"{REPO}@{first}", in_channels=1)
    assert pinned.pretrained_cfg["revision"] == first
    assert load_model(REPO, revision=first).pretrained_cfg["revision"] == first
    fake_hub.clear_log()
    architecture = load_model("test-org/config-only", pretrained=False)  # only config.json is fetched
    assert architecture.config == model.config and not architecture.load_report.loaded
    fetched = {r.path.rsplit("/", 1)[-1] for r in fake_hub.requests() if "/resolve/" in r.path}
    assert fetched == {"config.json"}
    fake_hub.clear_log()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert equal_states(load_model(f"{REPO}@{first}").state_dict(), expected)  # a cached commit: no request
    assert fake_hub.requests() == []


def test_the_weights_of_a_repository_are_checked_against_the_hubs_sha256_on_every_load(hub_repo, fake_hub,
                                                                                       converted_small):
    first, _ = hub_repo
    expected = read_folder(converted_small).state
    load_model(f"{REPO}@{first}")
    weights_sha256 = hashlib.sha256((converted_small / "model.safetensors").read_bytes()).hexdigest()
    blob = hf_isolated_cache() / "blobs" / weights_sha256  # the weights, not config.json (also stored by sha256)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the cache corrupted afterwards, same size
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="force_download=True"):
        load_model(f"{REPO}@{first}")
    assert equal_states(load_model(f"{REPO}@{first}", force_download=True).state_dict(), expected)
    config = Path(os.path.realpath(snapshot_file(first, "config.json")))
    config.chmod(0o644)
    config.write_bytes(config.read_bytes().replace(b"head_channels", b"head_chan\xffels"))
    with pytest.raises(ChecksumError, match="cached config.json has"):
        load_model(f"{REPO}@{first}")
    load_model(f"{REPO}@{first}", force_download=True)
    fake_hub.faults[weights_sha256] = Fault("corrupt")  # a transfer corrupted on the way, same size
    with pytest.raises(ChecksumError, match="but the Hub gave"):
        load_model(f"{REPO}@{first}", force_download=True)


def snapshot_file(commit: str, filename: str) -> Path:
    return hf_isolated_cache() / "snapshots" / commit / filename


def hf_isolated_cache():
    from huggingface_hub import constants as hub_constants

    return Path(hub_constants.HF_HUB_CACHE) / f"models--{REPO.replace('/', '--')}"


def test_repository_errors_name_the_repository_and_the_fix(hub_repo, fake_hub, monkeypatch):
    first, _ = hub_repo
    with pytest.raises(DownloadError, match="no repository test-org/missing .* check the id"):
        load_model("test-org/missing")
    with pytest.raises(DownloadError, match="has no revision 'v9'"):
        load_model(f"{REPO}@v9")
    fake_hub.commit("test-org/other", {"README.md": b"not a model\n"})
    with pytest.raises(DownloadError, match="has no config.json: it is not a repository written by"):
        load_model("test-org/other")
    with pytest.raises(UnisegHubError, match="give one"):
        load_model(f"{REPO}@{first}", revision="main")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(NotAvailableOfflineError, match="test-org/never-fetched is not in the huggingface_hub cache"):
        load_model("test-org/never-fetched")


def test_a_local_folder_wins_over_a_manifest_name(converted_small, tmp_path, monkeypatch):
    """As in transformers and timm: ``uniseg-11task`` in the working folder is that folder, not the manifest's
    model (which would be fetched from its upstream source)."""
    shutil.copytree(converted_small, tmp_path / "uniseg-11task")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # nothing may be fetched
    model = load_model("uniseg-11task")
    assert equal_states(model.state_dict(), read_folder(converted_small).state)
    assert model.pretrained_cfg["source"]["file"] == "model_final_checkpoint.model"
