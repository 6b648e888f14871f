"""The package's layout rules (README "Architecture"), read from the source: imports flow one way, the networks are
plain, the hub and the configuration import no torch, only the command line prints."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "uniseg_hub"

LAYERS = [
    {"errors", "tasks", "files", "config", "palette"},
    {"networks"},
    {"weights", "hub"},
    {"transfer", "upstream"},
    {"pretrained"},
    {"cpu"},
    {"pipeline"},
    {"training"},
    {"app"},
    {"cli", "__main__", "__init__"},
]
"""Each part of ``uniseg_hub`` may import its own layer and the layers above it, never one below."""

LAYER = {part: depth for depth, parts in enumerate(LAYERS) for part in parts}


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def part_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def package_imports(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, first component under uniseg_hub) of every import of the package in ``path``, at any depth."""
    depth = len(path.relative_to(root).parts) - 1
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                up = node.level - 1
                if up > depth:
                    continue
                base = list(path.relative_to(root).parts[:depth - up]) if up < depth else []
                target = base + (node.module.split(".") if node.module else [])
                names = [target[0]] if target else [a.name for a in node.names]
                found += [(node.lineno, n) for n in names]
            elif node.module and node.module.split(".")[0] == "uniseg_hub":
                parts = node.module.split(".")[1:]
                found += [(node.lineno, p) for p in ([parts[0]] if parts else [a.name for a in node.names])]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[1]) for a in node.names
                      if a.name.startswith("uniseg_hub.")]
    return found


def test_every_part_of_the_package_has_a_layer():
    assert {part_of(p) for p in modules()} <= set(LAYER) | {"weights_manifest"}, "add new folders to LAYERS"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_flow_one_way(path):
    own = LAYER[part_of(path)]
    wrong = [(line, name) for line, name in package_imports(path)
             if name in LAYER and LAYER[name] > own and name != "__version__"]
    assert not wrong, f"{path.relative_to(PACKAGE)} imports from a lower layer: {wrong}"


def test_the_networks_import_only_configuration_errors_and_tasks():
    for path in (PACKAGE / "networks").glob("*.py"):
        outside = {name for _, name in package_imports(path)} - {"networks", "config", "errors", "tasks"}
        outside -= {p.stem for p in (PACKAGE / "networks").glob("*.py")}
        assert not outside, f"{path.name} imports {outside}"


def test_only_main_imports_the_command_line():
    for path in modules():
        if path.name in ("__main__.py", "cli.py"):
            continue
        assert "cli" not in {name for _, name in package_imports(path)}, f"{path} imports uniseg_hub.cli"


def test_only_the_command_line_prints():
    for path in modules():
        if path.name in ("cli.py", "__main__.py"):
            continue
        calls = [node.lineno for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print"]
        assert not calls, f"{path.relative_to(PACKAGE)} prints at line(s) {calls}; return data or log instead"


def test_hub_and_configuration_import_no_torch():
    code = ("import sys, uniseg_hub.hub, uniseg_hub.config, uniseg_hub.files; "
            "uniseg_hub.hub.download, uniseg_hub.config.UniSegConfig(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'monai', 'numpy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_rules_catch_a_violation(tmp_path):
    """The checker itself: a network module importing the fast path is found."""
    fake = tmp_path / "uniseg_hub" / "networks" / "probe.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from ..cpu import fast_path\nfrom uniseg_hub.app import predict\nfrom .blocks import ConvBlock\n")
    assert package_imports(fake, fake.parents[1]) == [(1, "cpu"), (2, "app"), (3, "networks")]


def test_every_exception_lives_in_errors_py():
    for path in modules():
        if path.name == "errors.py":
            continue
        classes = [node.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ClassDef)
                   and any(getattr(b, "id", getattr(b, "attr", "")).endswith(("Error", "Exception"))
                           for b in node.bases)]
        assert not classes, f"{path.relative_to(PACKAGE)} defines {classes}; put exceptions in uniseg_hub/errors.py"


def test_the_networks_keep_no_module_state():
    for path in (PACKAGE / "networks").glob("*.py"):
        tree = ast.parse(path.read_text())
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.Global)], f"{path.name} rebinds a global"
