"""The `uniseg-hub` command line in subprocesses (HF_ENDPOINT pointing at the fake Hub), and publishing."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard, constants

from uniseg_hub import PublishError, cli, load_encoder, load_model
from uniseg_hub.app import publish as publishing
from uniseg_hub.config import ManifestEntry
from uniseg_hub.files import format_json, sha256_file
from uniseg_hub.weights import read_folder

pytest.register_assert_rewrite("fakehub")  # imported here before pytest loads it as a plugin

from fakehub import TOKEN, cli_env, manifest_with, serve  # noqa: E402

NAME = "uniseg-small"


def run(*args, env):
    return subprocess.run([sys.executable, "-m", "uniseg_hub", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)


def failed(result, code: int = 1) -> str:
    """stderr of a run that must exit with ``code`` and one line, no traceback."""
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    if code == 1:
        assert result.stderr.strip().count("\n") == 0, result.stderr
    return result.stderr


def make_bundle(root: Path) -> Path:
    """A minimal MONAI bundle folder, with things publish must leave out (caches, old weights)."""
    (root / "configs" / "__pycache__").mkdir(parents=True)
    (root / "configs" / "metadata.json").write_text(json.dumps({"version": "0.1.0", "monai_version": "1.4.0"}))
    (root / "configs" / "inference.json").write_text(json.dumps({"network_def": {"_target_": "uniseg_hub.UniSeg"}}))
    (root / "configs" / "__pycache__" / "x.pyc").write_bytes(b"")
    (root / "docs").mkdir()
    (root / "docs" / "README.md").write_text("# UniSeg bundle\n")
    (root / "LICENSE").write_text("UniSeg for non-commercial purposes\n")
    (root / "large_files.yml").write_text("large_files: []\n")
    (root / "models").mkdir()
    (root / "models" / "old.pt").write_bytes(b"stale")
    return root


BUNDLE_FILES = ["LICENSE", "README.md", "config.json", "configs/inference.json", "configs/metadata.json",
                "docs/README.md", "large_files.yml", "model.safetensors", "models/config.json", "models/model.pt",
                "models/model.safetensors"]


@pytest.mark.slow
def test_every_command_against_the_fake_hub(fake_hub, small_release, tmp_path):
    manifest, entry = serve(fake_hub, small_release, tmp_path / "m.json", endpoint=False)  # HF_ENDPOINT decides
    for branch in ("1e5", "0123456789"):
        fake_hub.add_branch(entry["repo_id"], branch, entry["revision"])
    home = tmp_path / "home"
    env = cli_env(fake_hub, home, UNISEG_HUB_MANIFEST=manifest)

    listed = run("list", "--json", env=env)
    assert listed.returncode == 0 and [r["name"] for r in json.loads(listed.stdout)] == [NAME]
    assert f"{NAME}  published" in run("list", env=env).stdout
    printed = run("info", NAME, "--json", env=env).stdout
    info = json.loads(printed)
    assert info["sha256"] == entry["sha256"] and info["cache"] == {"path": None, "verified": False}
    assert printed == format_json(info) + "\n" and {**info, "cache": None} == {**entry, "cache": None}

    downloaded = run("download", NAME, env=env)
    assert downloaded.returncode == 0, downloaded.stderr
    path = downloaded.stdout.strip()
    assert "\n" not in path and sha256_file(path) == entry["sha256"] and path.startswith(str(home / "hub"))
    requests = fake_hub.requests()
    assert [(r.server, r.method) for r in requests] == [("hub", "HEAD"), ("cdn", "GET")]
    assert requests[0].headers["user-agent"].startswith("uniseg-hub/0.1.0;")
    fake_hub.clear_log()
    assert json.loads(run("download", NAME, "--json", env=env).stdout)["path"] == path
    assert run("path", NAME, env=env).stdout.strip() == path
    assert "is intact" in run("verify", NAME, env=env).stdout
    assert run("path", env=env).stdout.strip() == str(home / "hub")
    assert json.loads(run("info", NAME, "--json", env=env).stdout)["cache"] == {"path": path, "verified": True}
    assert fake_hub.requests() == []  # a cached pinned file needs no network

    for revision in ("1e5", "0123456789"):  # numbers to fire, strings to us
        for flag in (["--revision", revision], [f"--revision={revision}"], ["-r", revision]):
            result = run("download", NAME, *flag, "--json", env=env)
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout)["revision"] == revision
        assert f"/resolve/{revision}/model.safetensors" in fake_hub.requests("hub", "HEAD")[-1].path

    fake_hub.clear_log()
    offline = cli_env(fake_hub, home, UNISEG_HUB_MANIFEST=manifest, HF_HUB_OFFLINE=1)
    assert run("download", NAME, env=offline).stdout.strip() == path
    assert run("path", NAME, env=offline).stdout.strip() == path
    assert fake_hub.requests() == []
    empty = cli_env(fake_hub, tmp_path / "empty", UNISEG_HUB_MANIFEST=manifest, HF_HUB_OFFLINE=1)
    message = failed(run("download", NAME, env=empty))
    assert f"uniseg-hub download {NAME}" in message and str(tmp_path / "empty" / "hub") in message
    assert "not in the cache" in failed(run("verify", NAME, env=empty))
    assert fake_hub.requests() == []

    assert "lists: uniseg-small" in failed(run("info", "nope", env=env))
    shipped = failed(run("download", "uniseg-11task", env=cli_env(fake_hub, home, HF_HUB_OFFLINE=1)))
    assert "drive.google.com" in shipped and "uniseg-hub convert" in shipped
    blob = Path(path).resolve()
    blob.write_bytes(blob.read_bytes()[::-1])
    assert f"uniseg-hub download {NAME} --force" in failed(run("verify", NAME, env=env))
    assert run("download", NAME, "--force", env=env).returncode == 0
    assert "is intact" in run("verify", NAME, env=env).stdout


def test_proxy_settings_reach_the_client(fake_hub, small_release, tmp_path):
    """The endpoint's host does not resolve: the download can only work through HTTP_PROXY (the fake Hub)."""
    manifest, entry = serve(fake_hub, small_release, tmp_path / "m.json", endpoint=False)
    env = cli_env(fake_hub, tmp_path / "home", UNISEG_HUB_MANIFEST=manifest, HF_ENDPOINT="http://hub.invalid",
                  HTTP_PROXY=fake_hub.url, http_proxy=fake_hub.url)
    result = run("download", NAME, env=env)
    assert result.returncode == 0, result.stderr
    assert sha256_file(result.stdout.strip()) == entry["sha256"]
    assert fake_hub.requests("hub", "HEAD")[0].path.startswith("http://hub.invalid/test-org/uniseg-small/resolve/")


def test_help_everywhere_and_usage_errors_before_anything_runs(fake_hub, converted_small, tmp_path):
    home = tmp_path / "home"
    env = cli_env(fake_hub, home)
    helps = {"list": "List the models", "info": "manifest entry", "download": "sha256", "verify": "Hash",
             "path": "cache folder", "convert": "OUT_DIR", "publish": "REPO_ID"}
    for command, text in helps.items():
        result = run(command, "--help", env=env)
        assert result.returncode == 0 and text in result.stdout + result.stderr, (command, result.stderr)
    top = run("--help", env=env)
    assert top.returncode == 0 and all(c in top.stdout + top.stderr for c in helps)
    assert run("download", NAME, "--revision", "x", "--help", env=env).returncode == 0

    misspelt = [("download", NAME, "--revison", "x"), ("verify", NAME, "--cache-dri", "d"), ("path", "--jsn"),
                ("list", "--manifes", "m.json"), ("info", NAME, "--jason"),
                ("publish", converted_small, "--repo-id", "test-org/x", "--dryrun"),
                ("convert", "a.model", tmp_path / "out", "--overwrit")]
    for args in misspelt:
        result = run(*args, env=env)
        assert f"unknown option {[a for a in args if str(a).startswith('--')][-1]}" in failed(result, 2)
    assert "unexpected argument(s) extra" in failed(run("download", NAME, "extra", env=env), 2)
    failed(run("download", env=env), 2)
    failed(run("publish", converted_small, env=env), 2)  # --repo-id is required
    failed(run("fetch", NAME, env=env), 2)
    assert fake_hub.requests() == [] and not home.exists() and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_publish_dry_run_is_served_and_loads_back_equal(fake_hub, hf_isolated, converted_small, tmp_path):
    bundle, out, home = make_bundle(tmp_path / "bundle"), tmp_path / "repo", tmp_path / "home"
    env = cli_env(fake_hub, home)
    result = run("publish", converted_small, "--repo-id", "test-org/uniseg-rt", "--name", "uniseg-rt",
                 "--bundle-dir", bundle, "--out-dir", out, "--dry-run", "--json", env=env)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    entry = printed["entry"]
    assert printed["commit"] is None and entry["revision"] is None and fake_hub.requests() == []
    assert printed["files"] == BUNDLE_FILES and printed["folder"] == str(out)
    assert entry["sha256"] == sha256_file(converted_small / "model.safetensors")
    assert (out / "models" / "model.safetensors").read_bytes() == (converted_small / "model.safetensors").read_bytes()
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "other" and card.data.library_name == "uniseg-hub"
    assert card.data.license_link == entry["license"]["url"] and "monai" in card.data.tags
    assert "non-commercial" in card.text.lower() and 'source="huggingface_hub"' in card.text

    sha = fake_hub.commit_folder("test-org/uniseg-rt", out)
    manifest = manifest_with(tmp_path / "m.json", {**entry, "revision": sha}, endpoint=fake_hub.url)
    source = read_folder(converted_small).state
    model = load_model("uniseg-rt", manifest=manifest)
    assert model.state_dict().keys() == source.keys()
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())
    encoder = load_encoder("uniseg-rt", manifest=manifest, in_channels=4)
    assert all(torch.equal(v, source[f"encoder.{k}"]) for k, v in encoder.state_dict().items())

    bundles = tmp_path / "bundles"
    monai = subprocess.run([sys.executable, "-c", "import monai.bundle; monai.bundle.download(name='uniseg_rt', "
                            f"source='huggingface_hub', repo='test-org/uniseg-rt', bundle_dir={str(bundles)!r})"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert monai.returncode == 0, monai.stderr
    got = bundles / "uniseg_rt"
    assert sorted(p.relative_to(got).as_posix() for p in got.rglob("*")
                  if p.is_file() and ".cache" not in p.parts) == BUNDLE_FILES
    assert sha256_file(got / "models" / "model.safetensors") == entry["sha256"]


MONAI_CLIENT = """
import json, sys, torch, monai.bundle
name, repo, bundles, fields = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
monai.bundle.download(name=name, source="huggingface_hub", repo=repo, bundle_dir=bundles)
model = monai.bundle.load(name=name, source="huggingface_hub", repo=repo, bundle_dir=bundles,
                          workflow_type="inference", net_override=fields, device="cpu")
torch.save(model.state_dict(), sys.argv[5])
"""


@pytest.mark.slow
def test_the_published_repository_is_a_monai_bundle_for_download_load_and_large_files(fake_hub, converted_small,
                                                                                        tmp_path):
    """What a MONAI user runs against the published repository (real bundle configs, the real clients in fresh
    processes): download picks the version tag, load builds the inference network_def and reads models/model.pt,
    download_large_files re-fetches the model files from the tag and checks their sha256."""
    env = cli_env(fake_hub, tmp_path / "home", HF_TOKEN=TOKEN)
    result = run("publish", converted_small, "--repo-id", "test-org/uniseg-mb", "--json", env=env)
    assert result.returncode == 0, result.stderr
    published = json.loads(result.stdout)
    assert fake_hub.repos["test-org/uniseg-mb"]["tags"] == {"v0.1.0": published["commit"]}

    bundles, state_file = tmp_path / "bundles", tmp_path / "state.pt"
    fields = read_folder(converted_small).config.to_dict()["config"]
    client = subprocess.run([sys.executable, "-c", MONAI_CLIENT, "uniseg_mb", "test-org/uniseg-mb", str(bundles),
                             json.dumps(fields), str(state_file)], capture_output=True, text=True, env=env,
                            timeout=300)
    assert client.returncode == 0, client.stderr
    asked = [r.path for r in fake_hub.requests("hub") if "/revision/" in r.path]
    assert asked == ["/api/models/test-org/uniseg-mb/revision/v0.1.0"], asked  # MONAI's latest version: the tag
    source, loaded = read_folder(converted_small).state, torch.load(state_file, weights_only=True)
    assert loaded.keys() == source.keys() and all(torch.equal(loaded[k], v) for k, v in source.items())

    got = bundles / "uniseg_mb"
    listed = yaml.safe_load((got / "large_files.yml").read_text())["large_files"]
    assert listed == published["large_files"]
    assert [sha256_file(got / item["path"]) for item in listed] == [item["hash_val"] for item in listed]
    for item in listed:
        (got / item["path"]).unlink()
    fetched = subprocess.run([sys.executable, "-m", "monai.bundle", "download_large_files", "--bundle_path",
                              str(got)], capture_output=True, text=True, env=env, timeout=300)
    assert fetched.returncode == 0, fetched.stderr
    assert [sha256_file(got / item["path"]) for item in listed] == [item["hash_val"] for item in listed]

    again = run("publish", converted_small, "--repo-id", "test-org/uniseg-mb", env=env)
    assert "already has the tag v0.1.0" in failed(again)
    assert len(fake_hub.repos["test-org/uniseg-mb"]["commits"]) == 1


def test_publish_uploads_one_commit_and_prints_the_entry_pinned_to_it(fake_hub, hf_isolated, converted_small,
                                                                      tmp_path, monkeypatch, capsys):
    """In-process (the subprocess path is the dry run's): the token comes from HF_TOKEN, the Hub from HF_ENDPOINT
    (patched only around the uploads: huggingface_hub builds download URLs from the endpoint it was imported with)."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    bundle = make_bundle(tmp_path / "bundle")
    with monkeypatch.context() as patch:
        patch.setattr(constants, "ENDPOINT", fake_hub.url)
        cli.main(["publish", str(converted_small), "--repo-id", "test-org/uniseg-up", "--bundle-dir", str(bundle),
                  "--json"])
        printed = json.loads(capsys.readouterr().out)
        repo = fake_hub.repos["test-org/uniseg-up"]
        first = printed["commit"]
        again = publishing.publish(converted_small, "test-org/uniseg-up", bundle=False, tag="v0.1.0-2")
        with pytest.raises(PublishError, match=f"already has the tag v0.1.0 \\(commit {first}\\).*another --tag"):
            publishing.publish(converted_small, "test-org/uniseg-up", bundle=False)
        with pytest.raises(PublishError, match="HTTP 401.*hf auth login"):
            publishing.publish(converted_small, "test-org/uniseg-up", token=False, tag="v9")
    assert first == printed["entry"]["revision"] and repo["refs"]["main"] == again["commit"] != first
    assert sorted(repo["commits"][first]) == BUNDLE_FILES and printed["folder"] is None
    assert sorted(repo["commits"][again["commit"]]) == ["README.md", "config.json", "model.safetensors"]
    assert [item["path"] for item in printed["large_files"]] == ["models/model.safetensors", "models/config.json",
                                                                 "models/model.pt"]
    assert printed["large_files"][0]["url"] == f"{fake_hub.url}/test-org/uniseg-up/resolve/v0.1.0/models/" \
                                               "model.safetensors"
    assert printed["large_files"][0]["hash_val"] == printed["entry"]["sha256"] and printed["tag"] == "v0.1.0"
    assert repo["tags"] == {"v0.1.0": first, "v0.1.0-2": again["commit"]} and len(repo["commits"]) == 2
    posts = fake_hub.requests("hub", "POST")
    assert [p.path for p in posts[:4]] == ["/api/repos/create", "/api/validate-yaml",
                                           "/api/models/test-org/uniseg-up/preupload/main",
                                           "/api/models/test-org/uniseg-up/commit/main"]
    assert all(p.headers["user-agent"].startswith("uniseg-hub/0.1.0;") for p in posts)
    manifest = manifest_with(tmp_path / "m.json", printed["entry"], endpoint=fake_hub.url)
    source = read_folder(converted_small).state
    assert all(torch.equal(v, source[k]) for k, v in load_model("uniseg-up", manifest=manifest).state_dict().items())
    with pytest.raises(PublishError, match="ORG/NAME"):
        publishing.publish(converted_small, "no-org", dry_run=True)
    with pytest.raises(PublishError, match="needs model.safetensors and config.json"):
        publishing.publish(tmp_path, "test-org/x", dry_run=True)


def test_publish_finds_the_bundle_folder_or_says_it_left_it_out(converted_small, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(publishing, "packaged_bundle_dir", lambda required=True: None)
    cli.main(["publish", str(converted_small), "--repo-id", "test-org/uniseg-small", "--dry-run",
              "--out-dir", str(tmp_path / "a")])
    text = capsys.readouterr().out
    assert "model files only, no MONAI bundle (no bundle/ folder here; pass --bundle-dir)" in text
    assert "manifest entry (add it to the models list of weights_manifest.json):" in text
    pasted = json.loads(text.split("weights_manifest.json):\n", 1)[1])  # the entry, as JSON to paste
    assert pasted["name"] == "uniseg-small" and pasted["revision"] is None and pasted["published"] is True
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    bundle = make_bundle(tmp_path / "bundle")
    monkeypatch.setattr(publishing, "packaged_bundle_dir", lambda required=True: bundle)
    result = publishing.publish(converted_small, "test-org/uniseg-small", dry_run=True, out_dir=tmp_path / "b")
    assert result["bundle"] == str(tmp_path / "bundle") and result["files"] == BUNDLE_FILES
    with pytest.raises(PublishError, match="is not a MONAI bundle folder"):
        publishing.publish(converted_small, "test-org/x", dry_run=True, bundle_dir=tmp_path / "a")


def test_publish_refuses_links_and_an_out_dir_inside_the_bundle(converted_small, tmp_path):
    """A symbolic link in the bundle (or the weights folder) would upload what it points to: refused, nothing built."""
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the Hub")
    bundle = make_bundle(tmp_path / "bundle")
    (bundle / "docs" / "notes.txt").symlink_to(secret)
    with pytest.raises(PublishError, match=r"notes.txt is a symbolic link .*secret.txt"):
        publishing.publish(converted_small, "test-org/x", dry_run=True, bundle_dir=bundle, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (bundle / "docs" / "notes.txt").unlink()
    with pytest.raises(PublishError, match="lies inside the bundle folder"):
        publishing.publish(converted_small, "test-org/x", dry_run=True, bundle_dir=bundle, out_dir=bundle / "repo")
    assert not (bundle / "repo").exists()
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "config.json").write_bytes((converted_small / "config.json").read_bytes())
    (weights / "model.safetensors").symlink_to(converted_small / "model.safetensors")
    with pytest.raises(PublishError, match="model.safetensors is a symbolic link"):
        publishing.publish(weights, "test-org/x", dry_run=True, bundle=False, out_dir=tmp_path / "out2")


def test_argument_guard_keeps_strings_and_lets_variadic_commands_through(monkeypatch):
    def fixed(name, *, revision=None, force: bool = False):
        """A command with fixed arguments."""

    def variadic(*images, out=None, overlap: float = 0.5, **overrides):
        """A command taking any number of inputs and free-form options."""

    monkeypatch.setitem(cli.COMMANDS, "fixed", fixed)
    monkeypatch.setitem(cli.COMMANDS, "variadic", variadic)
    assert cli.guard_args("fixed", ["1e5", "-r", "0x10", "--force"]) == ["'1e5'", "--revision='0x10'", "--force=True"]
    assert cli.guard_args("fixed", ["--force", "false", "007"]) == ["--force=False", "'007'"]
    assert cli.guard_args("fixed", ["--noforce", "a"]) == ["--force=False", "'a'"]
    assert cli.guard_args("variadic", ["a.nii", "b.nii", "--out", "o", "--overlap", "0.25", "--roi", "2"]) == [
        "'a.nii'", "'b.nii'", "--out='o'", "--overlap=0.25", "--roi", "2"]
    with pytest.raises(SystemExit) as usage:
        cli.guard_args("fixed", ["a", "b"])
    assert usage.value.code == 2


@pytest.mark.parametrize("signum, code, word", [(2, 130, "interrupted"), (15, 143, "terminated")])
def test_a_signal_wrapped_by_a_library_still_exits_as_the_signal(monkeypatch, capsys, signum, code, word):
    """pydoc's import (MONAI's config parser) turns a signal during an import into ``ErrorDuringImport``."""
    import pydoc

    from uniseg_hub.errors import Interrupted

    def importing(name):
        """A command interrupted while a library imports."""
        try:
            raise Interrupted(signum)
        except BaseException:
            raise RuntimeError("parsing failed") from pydoc.ErrorDuringImport("monai.transforms", sys.exc_info())

    monkeypatch.setitem(cli.COMMANDS, "importing", importing)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["importing", "x"])
    captured = capsys.readouterr()
    assert exit_info.value.code == code and captured.err == f"{word}\n" and captured.out == ""


def test_publishing_the_official_name_completes_its_entry(converted_small, tmp_path):
    shipped = json.loads((Path(__file__).resolve().parents[1] / "weights_manifest.json").read_text())
    official = shipped["models"][0]
    result = publishing.publish(converted_small, "org/uniseg-11task", name="uniseg-11task", dry_run=True,
                                bundle=False, out_dir=tmp_path / "a")
    assert isinstance(result["entry"], ManifestEntry) and result["entry"].revision is None
    entry = result["entry"].to_dict()
    config = json.loads((converted_small / "config.json").read_text())
    assert entry["description"] == official["description"] and entry["license"] == official["license"]
    assert entry["source"]["original_url"] == official["source"]["original_url"]
    assert entry["source"]["original_sha256"] == config["source"]["sha256"] and "notes" not in entry
    other = {**official, "source": {**official["source"], "original_sha256": "0" * 64}}
    manifest = manifest_with(tmp_path / "m.json", other)
    with pytest.raises(PublishError, match="wrong checkpoint"):
        publishing.publish(converted_small, "org/uniseg-11task", name="uniseg-11task", dry_run=True,
                           bundle=False, manifest=manifest, out_dir=tmp_path / "b")
