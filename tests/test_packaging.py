"""The built package, installed for real (not editable) into a fresh environment outside the checkout, ships the
weights manifest and the MONAI bundle, and its command line works there."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a real pip install into a fresh virtual environment

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["setup.cfg", "pyproject.toml", "README.md", "LICENSE", "uniseg_hub", "bundle"]


def test_a_non_editable_install_outside_the_checkout_ships_the_manifest(tmp_path):
    source = tmp_path / "source"  # a copy, so the build writes nothing into the checkout
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # the dependencies (torch, monai, huggingface_hub, fire) and the build tools come from this environment, placed
    # after the new one's own site-packages: nothing is reinstalled, and its own copy of uniseg_hub comes first
    Path(site, "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "UNISEG_HUB_MANIFEST")}
    # build with this environment's setuptools, offline; without one, pip fetches it as `pip install .` does
    offline = ["--no-build-isolation", "--no-index"] if importlib.util.find_spec("setuptools") else []
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", *offline, str(source)],
                             capture_output=True, text=True, env=env, cwd=tmp_path)
    assert install.returncode == 0, install.stderr

    found = subprocess.run([python, "-c", "import json, uniseg_hub; from importlib import resources; print(json.dumps("
                            "[uniseg_hub.__file__, resources.files('uniseg_hub').joinpath('weights_manifest.json')"
                            ".read_text()]))"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    module, shipped = json.loads(found.stdout)
    assert Path(module).is_relative_to(venv) and shipped == (ROOT / "weights_manifest.json").read_text()

    # every module of the source tree is installed (a new folder must be listed in setup.cfg's packages)
    walk = ("import json, pkgutil, uniseg_hub; print(json.dumps(sorted(m.name for m in pkgutil.walk_packages("
            "uniseg_hub.__path__, 'uniseg_hub.') if not m.name.startswith('uniseg_hub.bundle'))))")
    modules = subprocess.run([python, "-c", walk], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert modules.returncode == 0, modules.stderr
    package = ROOT / "uniseg_hub"
    expected = sorted("uniseg_hub." + ".".join(p.relative_to(package).with_suffix("").parts).removesuffix(".__init__")
                      for p in package.rglob("*.py") if p.name != "__init__.py" or p.parent != package)
    assert json.loads(modules.stdout) == expected

    bundle = subprocess.run([python, "-c", "from uniseg_hub.app.bundle import bundle_dir; print(bundle_dir())"],
                            capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bundle.returncode == 0, bundle.stderr
    shipped_bundle = Path(bundle.stdout.strip())
    assert shipped_bundle.is_relative_to(venv)  # the installed copy, not the checkout's bundle/
    for name in ("configs/inference.json", "configs/evaluate.json", "configs/metadata.json", "LICENSE"):
        assert (shipped_bundle / name).read_text() == (ROOT / "bundle" / name).read_text()

    listed = subprocess.run([venv / "bin" / "uniseg-hub", "list", "--json"], capture_output=True, text=True,
                            env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert [m["name"] for m in json.loads(listed.stdout)] == ["uniseg-11task"]
    info = subprocess.run([venv / "bin" / "uniseg-hub", "info", "uniseg-11task", "--json"], capture_output=True,
                          text=True, env=env, cwd=tmp_path)
    assert json.loads(info.stdout)["license"]["commercial_use"] is False
