"""Models that exist only as their original checkpoint (the manifest's ``upstream``): fetched through the real gdown
from a server on 127.0.0.1 (the CDN of tests/fakehub.py), verified, converted once, then loaded from the cache.

Not covered: gdown's handling of Google Drive itself (the download URL of a file id, the virus-scan confirmation
page), which it does only for Drive hosts; a 127.0.0.1 URL is fetched as it is."""

import argparse
import hashlib
import io
import json
import logging
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

from uniseg_hub import (
    ChecksumError,
    DownloadError,
    ManifestError,
    NotAvailableOfflineError,
    NotPublishedError,
    UpstreamFileError,
    download,
    hub,
    load_encoder,
    load_model,
    upstream,
    weights,
)
from uniseg_hub.errors import IncompleteDownloadError
from uniseg_hub.files import sha256_file
from uniseg_hub.weights import read_folder

from official_format import save_official_checkpoint

pytest.register_assert_rewrite("fakehub")

from fakehub import Fault, cli_env, manifest_with  # noqa: E402

NAME = "uniseg-small"
FILE = "model_final_checkpoint.model"


def cdn_gets(fake) -> list:
    return fake.requests("cdn", "GET")


def serve_bytes(fake, data: bytes) -> str:
    """The URL at which the fake CDN serves ``data``."""
    digest = hashlib.sha256(data).hexdigest()
    fake.blobs[digest] = data
    return f"{fake.cdn_url}/cdn/{digest}"


def small_entry(converted_small, url: str, size=None, sha256=None) -> dict:
    """The shipped official entry with the small architecture and an upstream at ``url``."""
    entry = hub.packaged_manifest().entry("uniseg-11task").to_dict()
    architecture = read_folder(converted_small, tensors=False).config.to_dict()
    return {**entry, "name": NAME, "architecture": architecture,
            "upstream": {**entry["upstream"], "url": url, "size": size, "sha256": sha256}}


@pytest.fixture
def served(fake_hub, hf_isolated, official_small, converted_small, tmp_path, monkeypatch):
    """Serve the small official file; returns a function (data, pinned) -> (manifest path, url), which also
    points UNISEG_HUB_MANIFEST at that manifest."""
    monkeypatch.delenv(upstream.CACHE_ENV, raising=False)

    def serve(data: bytes = official_small[0].read_bytes(), pinned: bool = False, name: str = "m.json"):
        url = serve_bytes(fake_hub, data)
        real = official_small[0].read_bytes()
        pins = dict(size=len(real), sha256=hashlib.sha256(real).hexdigest()) if pinned else {}
        path = manifest_with(tmp_path / name, small_entry(converted_small, url, **pins))
        monkeypatch.setenv("UNISEG_HUB_MANIFEST", str(path))
        return path, url

    return serve


def folder_of(cache: Path) -> Path:
    return cache / "uniseg-hub" / NAME


def trusted(cache: Path) -> list[str]:
    """What a later run could trust: the record and the converted weights (nothing else is ever read)."""
    return sorted(p.name for p in folder_of(cache).glob("*") if p.name in (upstream.RECORD_FILE, "model.safetensors"))


# ------------------------------------------------------------------------------------------------ the manifest


def test_the_shipped_entry_names_the_drive_file_and_invents_nothing():
    entry = hub.manifest_entry("uniseg-11task")
    assert entry.upstream.url == entry.source["original_url"]
    assert "1Ldgd5Ebc8VQrvGIpIgzUG2PTSDPUpEQJ" in entry.upstream.url
    assert (entry.upstream.filename, entry.upstream.format) == (FILE, "nnU-Net v1 .model")
    assert entry.upstream.size is None and entry.upstream.sha256 is None
    assert upstream.WEIGHTS_FILE == weights.WEIGHTS_FILE
    # the official architecture is 115 tensors, 32,114,381 parameters: what a fetched file must be exactly
    with torch.device("meta"):
        network = weights.build_network(entry.architecture)
    assert len(network.state_dict()) == 115 and sum(p.numel() for p in network.parameters()) == 32_114_381


@pytest.mark.parametrize("change, message", [
    ({"url": "ftp://x/y"}, "upstream.url"),
    ({"sha256": "ABC"}, "upstream.sha256"),
    ({"size": True}, "upstream.size"),
    ({"size": 0}, "upstream.size"),
    ({"filename": "../x.model"}, "upstream.filename"),
    ({"format": "safetensors"}, "upstream.format"),
    ({"extra": 1}, "exactly url, filename, format, size, sha256"),
])
def test_a_bad_upstream_is_refused_by_name(change, message):
    entry = hub.packaged_manifest().entry("uniseg-11task").to_dict()
    entry["upstream"] = {**entry["upstream"], **change}
    with pytest.raises(ManifestError, match=message):
        hub.parse_manifest({"schema_version": 1, "models": [entry]})


def test_an_entry_without_hub_copy_or_upstream_is_not_published(tmp_path):
    entry = hub.packaged_manifest().entry("uniseg-11task").to_dict()
    del entry["upstream"]
    path = manifest_with(tmp_path / "m.json", entry)
    for load in (lambda: download("uniseg-11task", manifest=path), lambda: load_model("uniseg-11task", manifest=path)):
        with pytest.raises(NotPublishedError, match="uniseg-hub convert"):
            load()


# ------------------------------------------------------------------------------------------- fetch and convert


def test_first_use_fetches_verifies_converts_then_loads_without_requests(served, fake_hub, hf_isolated,
                                                                          converted_small, official_small, caplog):
    served()
    with caplog.at_level(logging.WARNING, logger="uniseg_hub"):
        model = load_model(NAME)
    assert len(cdn_gets(fake_hub)) == 1
    expected = read_folder(converted_small).state
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    lines = [r.getMessage() for r in caplog.records]
    licence = [line for line in lines if "licence" in line]
    assert len(licence) == 1 and "non-commercial" in licence[0] and "size unknown" in licence[0]
    unpinned = [line for line in lines if "not pinned" in line]
    assert len(unpinned) == 1 and sha256_file(official_small[0]) in unpinned[0]
    # only the conversion stays: the original and every partial file are gone
    assert sorted(p.name for p in folder_of(hf_isolated).iterdir()) == ["config.json", "converted.json",
                                                                         "model.safetensors"]
    fake_hub.clear_log()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="uniseg_hub"):
        encoder = load_encoder(NAME, in_channels=2)
    assert fake_hub.requests() == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # no licence line, no unpinned warning
    assert encoder.pretrained_cfg["weights"] == str(folder_of(hf_isolated) / "model.safetensors")
    assert download(NAME) == folder_of(hf_isolated) / "model.safetensors" and fake_hub.requests() == []


def test_a_pinned_file_is_held_to_its_sha256_without_warning(served, fake_hub, hf_isolated, caplog):
    served(pinned=True)
    with caplog.at_level(logging.WARNING, logger="uniseg_hub"):
        path = download(NAME)
    assert path.is_file() and not [r for r in caplog.records if "not pinned" in r.getMessage()]


def test_the_cache_location_follows_uniseg_hub_cache(served, fake_hub, tmp_path, monkeypatch):
    served()
    monkeypatch.setenv(upstream.CACHE_ENV, str(tmp_path / "mine"))
    assert download(NAME) == tmp_path / "mine" / NAME / "model.safetensors"


def test_a_conversion_damaged_afterwards_is_caught_and_force_repairs_it(served, fake_hub, hf_isolated):
    served()
    path = download(NAME)
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    fake_hub.clear_log()
    with pytest.raises(ChecksumError) as caught:
        load_model(NAME)
    message = str(caught.value)
    assert str(path) in message and f"uniseg-hub download {NAME} --force" in message and "delete" in message
    assert fake_hub.requests() == []
    assert download(NAME, force=True) == path and len(cdn_gets(fake_hub)) == 1
    assert load_model(NAME).load_report.loaded


# ---------------------------------------------------------------------------------------- what goes wrong


def _nan_inside(data: bytes) -> bytes:
    """The checkpoint with one float of one tensor set to NaN, same size (the zip stores tensors uncompressed)."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        offset = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size >= 64).header_offset
    name, extra = struct.unpack("<HH", data[offset + 26:offset + 30])  # the local header's own lengths
    start = offset + 30 + name + extra
    bad = bytearray(data)
    bad[start + 32:start + 36] = b"\xff\xff\xff\x7f"
    return bytes(bad)


def _damaged_pickle(data: bytes) -> bytes:
    """The checkpoint with bytes in the middle of its pickle (data.pkl) overwritten, same size."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
    name, extra = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    middle = info.header_offset + 30 + name + extra + info.file_size // 2
    return data[:middle] + b"\xff" * 8 + data[middle + 8:]


def _misshaped(state, tmp_path) -> bytes:
    """The small official state with a one-dimensional prompt: allowed by the reader, not the architecture."""
    path = tmp_path / "misshaped.model"
    save_official_checkpoint(path, {**state, "intermedia_prompt": torch.zeros(11)})
    return path.read_bytes()


def _not_uniseg(tmp_path) -> bytes:
    path = tmp_path / "other.model"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(3, 3)}}, path)
    return path.read_bytes()


def _unsafe(tmp_path) -> bytes:
    path = tmp_path / "unsafe.model"
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=1)}, path)
    return path.read_bytes()


BAD_FILES = {  # kind: (bytes from the official file, its state dict and a folder; what the error says)
    "truncated": (lambda data, state, tmp: data[: len(data) // 2], "was refused"),
    "nan": (lambda data, state, tmp: _nan_inside(data), "not finite"),
    "damaged pickle": (lambda data, state, tmp: _damaged_pickle(data), "was refused"),
    "misshaped": (lambda data, state, tmp: _misshaped(state, tmp), "was refused"),
    "not uniseg": (lambda data, state, tmp: _not_uniseg(tmp), "was refused"),
    "unsafe pickle": (lambda data, state, tmp: _unsafe(tmp), "argparse.Namespace"),
    "html page": (lambda data, state, tmp: b"<!DOCTYPE html><html><body>Quota exceeded</body></html>" + b" " * 1000,
                  "HTML page"),
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_an_unpinned_file_that_is_not_the_model_is_refused_and_deleted(kind, served, fake_hub, hf_isolated,
                                                                        official_small, tmp_path):
    make, problem = BAD_FILES[kind]
    bad = make(official_small[0].read_bytes(), official_small[1], tmp_path)
    served(bad)
    with pytest.raises(UpstreamFileError) as caught:
        load_model(NAME)
    message = str(caught.value)
    assert problem in message and "it was deleted" in message and "uniseg-hub convert" in message
    assert isinstance(caught.value, ChecksumError) and caught.value.actual == hashlib.sha256(bad).hexdigest()
    assert not any(folder_of(hf_isolated).iterdir()), "something of the bad file stayed in the cache"
    served()  # the right file now: the next run fetches and converts it
    assert load_model(NAME).load_report.loaded


@pytest.mark.parametrize("fault", ["corrupt", "truncate"])
def test_a_pinned_file_with_another_sha256_or_size_is_refused(fault, served, fake_hub, hf_isolated, official_small):
    _, url = served(pinned=True)
    fake_hub.faults[url.rsplit("/", 1)[1]] = Fault(fault)
    with pytest.raises(UpstreamFileError, match="instead of") as caught:
        download(NAME)
    assert caught.value.expected == sha256_file(official_small[0])
    assert trusted(hf_isolated) == [] and not list(folder_of(hf_isolated).glob(FILE + "*"))
    assert download(NAME).is_file()  # the fault was one-off


def test_a_dropped_connection_keeps_the_part_file_and_the_next_run_resumes(served, fake_hub, hf_isolated):
    _, url = served()
    # past gdown's first 512 KiB chunk, so that some bytes reach the .part file
    fake_hub.faults[url.rsplit("/", 1)[1]] = Fault("drop", after=(512 + 16) * 1024)
    with pytest.raises(IncompleteDownloadError) as caught:
        download(NAME)
    assert "resumes" in str(caught.value) and str(folder_of(hf_isolated)) in str(caught.value)
    (part,) = folder_of(hf_isolated).glob("*.part")
    size = part.stat().st_size
    assert trusted(hf_isolated) == [] and size > 0 and f"{size} bytes are kept" in str(caught.value)
    fake_hub.clear_log()
    assert download(NAME).is_file()
    assert cdn_gets(fake_hub)[-1].headers.get("range") == f"bytes={size}-"
    assert not list(folder_of(hf_isolated).glob("*.part"))


def test_an_unreachable_or_missing_file_is_a_download_error(served, fake_hub, hf_isolated):
    path, _ = served(b"x")
    manifest = json.loads(path.read_text())
    manifest["models"][0]["upstream"]["url"] = f"{fake_hub.cdn_url}/cdn/{'0' * 64}"
    with pytest.raises(DownloadError, match="could not be downloaded.*404"):
        download(NAME, manifest=manifest)
    assert trusted(hf_isolated) == []


# ------------------------------------------------------------------------------------------------ offline


def test_offline_uses_the_conversion_or_says_what_to_fetch(served, fake_hub, hf_isolated, monkeypatch, tmp_path):
    served()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(NotAvailableOfflineError) as caught:
        load_model(NAME)
    message = str(caught.value)
    assert f"uniseg-hub download {NAME}" in message and str(folder_of(hf_isolated)) in message
    assert "HF_HUB_OFFLINE=1" in message and "/cdn/" in message
    with pytest.raises(NotAvailableOfflineError, match="local_files_only"):
        download(NAME, local_files_only=True)
    assert fake_hub.requests() == []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    download(NAME)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fake_hub.clear_log()
    assert load_model(NAME).load_report.loaded and fake_hub.requests() == []


def test_the_offline_decision_imports_no_torch(served, tmp_path):
    manifest, _ = served()
    code = ("import sys, uniseg_hub\n"
            "try:\n    uniseg_hub.download('uniseg-small')\n"
            "except uniseg_hub.NotAvailableOfflineError:\n    print('offline')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'gdown')))")
    env = cli_env(None, tmp_path / "home", UNISEG_HUB_MANIFEST=manifest, HF_HUB_OFFLINE=1)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["offline", "[]"]


# ----------------------------------------------------------------------------------------------- concurrency


def test_four_processes_at_once_end_with_one_conversion(served, fake_hub, tmp_path):
    manifest, _ = served()
    env = cli_env(None, tmp_path / "home", UNISEG_HUB_MANIFEST=manifest)
    code = "import uniseg_hub; print(uniseg_hub.download('uniseg-small'))"
    runs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env) for _ in range(4)]
    outs = [run.communicate(timeout=120) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err for _, err in outs]
    paths = {out.strip() for out, _ in outs}
    folder = tmp_path / "home" / "hub" / "uniseg-hub" / NAME
    assert paths == {str(folder / "model.safetensors")}
    assert len(cdn_gets(fake_hub)) == 1
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "converted.json", "model.safetensors"]
    assert sum("licence" in err for _, err in outs) == 1


def test_the_command_line_fetches_converts_and_finds_it_offline(served, fake_hub, tmp_path):
    manifest, _ = served()
    env = cli_env(None, tmp_path / "home", UNISEG_HUB_MANIFEST=manifest)
    command = [sys.executable, "-m", "uniseg_hub"]
    result = subprocess.run([*command, "download", NAME], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "home" / "hub" / "uniseg-hub" / NAME / "model.safetensors"
    assert result.stdout.strip() == str(path)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2 and "non-commercial" in warnings[0] and "not pinned" in warnings[1]
    fake_hub.clear_log()
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    found = subprocess.run([*command, "path", NAME], capture_output=True, text=True, env=offline, timeout=120)
    assert found.stdout.strip() == str(path) and fake_hub.requests() == []
    info = subprocess.run([*command, "info", NAME, "--json"], capture_output=True, text=True, env=offline, timeout=120)
    assert json.loads(info.stdout)["cache"] == {"path": str(path), "verified": False}
    checked = subprocess.run([*command, "verify", NAME], capture_output=True, text=True, env=offline, timeout=120)
    assert f"is intact (sha256 {sha256_file(path)}" in checked.stdout
    path.write_bytes(path.read_bytes()[::-1])
    damaged = subprocess.run([*command, "verify", NAME], capture_output=True, text=True, env=offline, timeout=120)
    assert damaged.returncode == 1 and f"uniseg-hub download {NAME} --force" in damaged.stderr
    assert fake_hub.requests() == []
    empty = subprocess.run([*command, "download", NAME], capture_output=True, text=True, timeout=120,
                           env={**offline, "HF_HOME": str(tmp_path / "empty")})
    assert empty.returncode == 1 and empty.stderr.count("\n") == 1 and "HF_HUB_OFFLINE=1" in empty.stderr
