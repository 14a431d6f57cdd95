"""The layout's rules, checked: which wing may import which, no private names across modules, no global state
changed by the library (matplotlib backend, umask)."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "magprune"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# wing -> the wings its modules may import (see docs/architecture.md)
ALLOWED = {
    "kernels": {"kernels"},
    "core": {"core", "kernels"},
    "deploy": {"deploy", "core", "kernels"},
    "analysis": {"analysis", "core"},
    "experiment": {"experiment", "analysis", "deploy", "core", "kernels"},
    "cli": {"cli", "experiment", "analysis", "deploy", "core", "kernels", "package"},
}
WINGS = ("kernels", "deploy", "analysis", "experiment")


def wing_of(dotted: str) -> str:
    """``magprune.deploy.format`` -> ``deploy``; ``magprune.pruner`` -> ``core``; ``magprune`` -> ``package``."""
    parts = dotted.split(".")
    if parts == ["magprune"]:
        return "package"
    if parts[1] in WINGS:
        return parts[1]
    return "cli" if parts[1] in ("cli", "__main__") else "core"


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def magprune_imports(tree: ast.AST) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import of magprune in ``tree``, nested ones included."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "magprune":
            names = [a.name for a in node.names]
            if node.module == "magprune":  # from magprune import chunked: a submodule, or a re-exported name
                for name in names:
                    sub = f"magprune.{name}"
                    is_module = (SRC / name).is_dir() or (SRC / f"{name}.py").is_file()
                    found.append((sub, []) if is_module else ("magprune", [name]))
            else:
                found.append((node.module, names))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] == "magprune"]
    return found


MODULES = sorted(p for p in SRC.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_imports_from_a_layer_above_it_nor_private_names(path):
    own = module_name(path)
    wing = wing_of(own) if own != "magprune" else "package"
    if wing == "package":
        return  # the package's __init__ re-exports the public API of every wing
    tree = ast.parse(path.read_text())
    for target, names in magprune_imports(tree):
        assert wing_of(target) in ALLOWED[wing], f"{own} ({wing}) imports {target} ({wing_of(target)})"
        private = [n for n in names if n.startswith("_")]
        assert not private, f"{own} imports private names {private} from {target}"


@pytest.mark.parametrize("path", sorted(BENCHMARKS.glob("*.py")), ids=lambda p: p.name)
def test_benchmarks_use_public_names_only(path):
    source = path.read_text()
    for target, names in magprune_imports(ast.parse(source)):
        assert not [n for n in names if n.startswith("_")], f"{path.name} imports private names from {target}"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = ast.unparse(node.value)
            assert not any(word in base for word in ("pruner", "magprune")), \
                f"{path.name} reads the private attribute {base}.{node.attr}"


def test_layer_rules_catch_a_violation():
    """The checker itself: an upward import and a private import are both found."""
    tree = ast.parse("from magprune.experiment.train import fit\nfrom magprune.criteria import _flat_chunks\n")
    imports = magprune_imports(tree)
    assert wing_of(imports[0][0]) not in ALLOWED["core"]
    assert imports[1][1] == ["_flat_chunks"]


def test_plotting_leaves_the_matplotlib_backend_alone(tmp_path):
    """Library plots draw on a Figure of their own: a user's backend (here svg) is not switched to Agg."""
    code = (
        "import matplotlib\n"
        "matplotlib.use('svg')\n"
        "from magprune.analysis.plots import plot_tradeoff\n"
        f"plot_tradeoff({{'L2': [(0.5, 0.01), (0.9, 0.02)]}}, {str(tmp_path / 'fig.png')!r}, title='t')\n"
        "print(matplotlib.get_backend())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "svg"
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_writing_files_never_touches_the_umask(tmp_path):
    """write_atomic gives the permissions open() would (0o666 less the umask) without ever setting the umask
    (reading it means setting it, which races with other threads creating files)."""
    target = tmp_path / "out.bin"
    code = (
        "import os\n"
        "os.umask(0o027)\n"
        "def refuse(*args): raise AssertionError('the umask was changed')\n"
        "os.umask = refuse\n"
        "from magprune.fileio import write_atomic\n"
        f"write_atomic({str(target)!r}, b'data')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    assert target.read_bytes() == b"data"
    assert os.stat(target).st_mode & 0o777 == 0o640
    assert not list(tmp_path.glob(".*.tmp"))
