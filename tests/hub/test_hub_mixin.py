"""huggingface_hub's model-class convention on the networks (``UniSeg.from_pretrained``, ``save_pretrained``,
``push_to_hub``), through uniseg-hub's own loading and folder format: locally and against the fake Hub on
127.0.0.1, with the real huggingface_hub client."""

import json

import pytest
import torch
from huggingface_hub import ModelCard, constants

import uniseg_hub
from uniseg_hub import (
    ChecksumError,
    IncompatibleCheckpointError,
    UniSeg,
    UniSegBackbone,
    load_model,
    networks,
)
from uniseg_hub.hub import LIBRARY_NAME, MODEL_TAGS
from uniseg_hub.training import build_network
from uniseg_hub.weights import read_folder

pytest.register_assert_rewrite("fakehub")  # imported here before pytest loads it as a plugin

from fakehub import TOKEN, Fault, serve  # noqa: E402

REPO = "test-org/uniseg-small"


def equal_states(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def hub_endpoint(fake_hub, hf_isolated, monkeypatch):
    """The fake Hub as HF_ENDPOINT, for uniseg-hub (which reads it per call) and for huggingface_hub's ``HfApi``
    that ``push_to_hub`` uses (which read it at import time into its constants)."""
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        fake_hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    return fake_hub


def test_the_package_hands_out_the_hub_aware_classes_and_the_networks_stay_plain(converted_small):
    assert issubclass(UniSeg, networks.UniSeg) and issubclass(UniSegBackbone, networks.UniSegBackbone)
    assert not hasattr(networks.UniSeg, "from_pretrained") and not hasattr(networks.UniSegBackbone, "push_to_hub")
    model = load_model(converted_small)
    assert type(model) is UniSeg
    assert type(load_model(converted_small, num_classes=3)) is UniSegBackbone
    assert type(load_model(converted_small, pretrained=False, num_classes=3)) is UniSegBackbone
    assert type(build_network(3, converted_small)) is UniSegBackbone  # fine-tuning builds it too
    assert UniSeg(model.config).config == model.config  # built as the plain network is
    assert UniSeg(features=list(model.config.features), patch_size=list(model.config.patch_size)).config \
        == model.config


def test_save_pretrained_writes_the_folder_load_model_reads(converted_small, tmp_path):
    model = load_model(converted_small)
    model.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    saved = read_folder(tmp_path / "saved")
    assert saved.config == model.config and equal_states(saved.state, model.state_dict())
    assert saved.document["source"] == {"initialised_from": read_folder(converted_small).document["source"]}
    for loaded in (load_model(tmp_path / "saved"), UniSeg.from_pretrained(tmp_path / "saved")):
        assert type(loaded) is UniSeg and not loaded.training
        assert equal_states(loaded.state_dict(), model.state_dict())
    again = UniSeg.from_pretrained(tmp_path / "saved")
    again.save_pretrained(tmp_path / "saved")  # overwrites the folder, keeps the README
    assert read_folder(tmp_path / "saved").document == saved.document


def test_the_backbone_saves_loads_and_transfers(converted_small, tmp_path):
    backbone = UniSegBackbone.from_pretrained(converted_small, num_classes=3, deep_supervision=False)
    assert backbone.config.num_classes == 3 and not backbone.decoder.deep_supervision
    assert len(backbone.load_report.loaded) == 97  # the paper's transfer
    backbone.save_pretrained(tmp_path / "backbone")
    loaded = UniSegBackbone.from_pretrained(tmp_path / "backbone", map_location="cpu")
    assert equal_states(loaded.state_dict(), backbone.state_dict())
    assert loaded.decoder.deep_supervision


def test_another_architecture_is_refused(converted_small, tmp_path):
    UniSegBackbone.from_pretrained(converted_small, num_classes=3).save_pretrained(tmp_path / "backbone")
    with pytest.raises(IncompatibleCheckpointError, match="holds a UniSeg, not a UniSegBackbone: .*num_classes=N"):
        UniSegBackbone.from_pretrained(converted_small)
    with pytest.raises(IncompatibleCheckpointError, match="holds a UniSegBackbone, not a UniSeg: load it with "
                                                          "UniSegBackbone.from_pretrained"):
        UniSeg.from_pretrained(tmp_path / "backbone")
    with pytest.raises(IncompatibleCheckpointError, match="num_classes=3 builds the paper's downstream "
                                                          "UniSegBackbone, not a UniSeg"):
        UniSeg.from_pretrained(converted_small, num_classes=3)
    with pytest.raises(TypeError, match="device or map_location"):
        UniSeg.from_pretrained(converted_small, device="cpu", map_location="cpu")


def test_a_damaged_or_mismatched_folder_is_refused(converted_small, tmp_path):
    load_model(converted_small).save_pretrained(tmp_path / "damaged")
    (tmp_path / "damaged" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(IncompatibleCheckpointError, match="is not a readable safetensors file"):
        UniSeg.from_pretrained(tmp_path / "damaged")
    load_model(converted_small).save_pretrained(tmp_path / "mismatched")
    config = tmp_path / "mismatched" / "config.json"
    document = json.loads(config.read_text())
    document["config"]["features"][-1] = 32  # the tensors are 16 wide
    config.write_text(json.dumps(document))
    with pytest.raises(IncompatibleCheckpointError, match="does not fit UniSeg: .* wrong shape"):
        UniSeg.from_pretrained(tmp_path / "mismatched")


def test_a_hub_repository_loads_by_id_and_revision(hub_endpoint, small_release, converted_small):
    folder, _ = small_release
    first = hub_endpoint.commit_folder(REPO, folder)
    second = hub_endpoint.commit(REPO, {"README.md": b"second commit\n"})
    expected = read_folder(converted_small).state
    model = UniSeg.from_pretrained(REPO)
    assert type(model) is UniSeg and equal_states(model.state_dict(), expected)
    assert model.pretrained_cfg["repo_id"] == REPO and model.pretrained_cfg["revision"] == second
    assert UniSeg.from_pretrained(f"{REPO}@{first}").pretrained_cfg["revision"] == first
    assert UniSeg.from_pretrained(REPO, revision=first).pretrained_cfg["revision"] == first
    hub_endpoint.clear_log()
    UniSeg.from_pretrained(REPO, revision=first, force_download=True, token=TOKEN)
    assert len(hub_endpoint.requests("cdn", "GET")) == 2  # config.json and model.safetensors, fetched again
    assert {r.headers.get("authorization") for r in hub_endpoint.requests("hub")} == {f"Bearer {TOKEN}"}


def test_a_manifest_name_is_sha256_checked(hub_endpoint, small_release, tmp_path):
    manifest, entry = serve(hub_endpoint, small_release, tmp_path / "m.json")
    hub_endpoint.faults[entry["sha256"]] = Fault("corrupt", times=None)
    with pytest.raises(ChecksumError, match="again after fetching it a second time"):
        UniSeg.from_pretrained(entry["name"], manifest=manifest)


def test_push_to_hub_then_from_pretrained_gives_the_same_tensors(hub_endpoint, converted_small):
    model = UniSegBackbone.from_pretrained(converted_small, num_classes=3)
    with torch.no_grad():
        model.decoder.heads[0].weight.add_(1.0)  # fine-tuned, say
    model.push_to_hub("test-org/pushed", token=TOKEN)
    repo, sha = hub_endpoint.resolve("test-org/pushed", "main")
    assert sorted(repo["commits"][sha]) == ["README.md", "config.json", "model.safetensors"]
    loaded = UniSegBackbone.from_pretrained("test-org/pushed")
    assert equal_states(loaded.state_dict(), model.state_dict())
    assert loaded.config == model.config and loaded.pretrained_cfg["revision"] == sha
    assert loaded.pretrained_cfg["architecture"] == "UniSegBackbone"  # our config.json, not the mixin's
    card = ModelCard(hub_endpoint.blobs[repo["commits"][sha]["README.md"]].decode())
    assert card.data.library_name == LIBRARY_NAME == "uniseg-hub" and card.data.license == "other"
    assert set(MODEL_TAGS) <= set(card.data.tags) and "medical-imaging" in card.data.tags
    assert "uniseg_hub.load_model" in card.text
    assert uniseg_hub.load_model("test-org/pushed").config == model.config
