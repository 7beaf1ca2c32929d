"""The layering of docs/architecture.md, "Module map", checked by walking the imports.

`ground/` imports nothing of the project. The pure packages (paft/, the
tunnel/ codecs, signalling/, nat/ruleset.py) import only `ground` and each
other, and nothing that does I/O: no socket, no thread, no trio, no kernel
interface. Everything else may import them, never the other way round.
The data path's forwarders are sans-IO as well: they may add only the
anchor's key table (`anchor_node.sessions`, itself pure).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT = {"ground", "paft", "tunnel", "signalling", "nat", "upmt", "upmt_client", "anchor_node"}
PROJECT |= {"lab", "benchmarks", "tests"}
PURE_PACKAGES = ("paft", "tunnel", "signalling")
KERNEL_FACING = {"tunnel/sockets.py"}  # the edge of tunnel/: sockets bound to interfaces
PURE_EXTRA = ("nat/ruleset.py",)
PURE_TARGETS = {"ground", "paft", "tunnel", "signalling", "nat.ruleset"}
# Standard modules that mean I/O or threads; a pure module needs none of them
# (`socket` only for inet_pton/ntop is allowed: it does no I/O).
IO_MODULES = {"trio", "threading", "select", "fcntl", "subprocess", "pyroute2", "selectors"}


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(node.module)
            found.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _pure_files() -> list[Path]:
    files = [p for pkg in PURE_PACKAGES for p in sorted((ROOT / pkg).glob("*.py"))]
    files += [ROOT / extra for extra in PURE_EXTRA]
    return [p for p in files if str(p.relative_to(ROOT)) not in KERNEL_FACING]


def _project_module(name: str) -> str | None:
    top = name.split(".")[0]
    return name if top in PROJECT else None


def _allowed_for_pure(name: str) -> bool:
    if name == "tunnel.sockets" or name.startswith("tunnel.sockets."):
        return False
    if name.split(".")[0] == "nat":
        return name == "nat" or name.startswith("nat.ruleset")
    return any(name == t or name.startswith(t + ".") for t in PURE_TARGETS)


@pytest.mark.parametrize("path", _pure_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_pure_modules_import_only_ground_and_pure_modules(path: Path) -> None:
    bad = []
    for name in _imports(path):
        if _project_module(name) is not None and not _allowed_for_pure(name):
            bad.append(name)
        if name.split(".")[0] in IO_MODULES:
            bad.append(name)
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(set(bad))}"


@pytest.mark.parametrize(
    "path", sorted((ROOT / "ground").glob("*.py")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_ground_imports_nothing_of_the_project(path: Path) -> None:
    own = [n for n in _imports(path) if n.split(".")[0] in PROJECT and n.split(".")[0] != "ground"]
    assert not own, f"{path.relative_to(ROOT)} imports {own}"


def test_the_walk_sees_imports() -> None:
    """The checker itself: a module known to import the runtime is caught."""
    names = _imports(ROOT / "upmt_client" / "daemon.py")
    assert any(not _allowed_for_pure(n) for n in names if _project_module(n))
    assert len(_pure_files()) > 20


FORWARDERS = ("upmt_client/forwarder.py", "anchor_node/forwarder.py")
FORWARDER_EXTRA = ("anchor_node.sessions",)


@pytest.mark.parametrize("relative", FORWARDERS)
def test_forwarders_are_sans_io(relative: str) -> None:
    bad = [
        name
        for name in _imports(ROOT / relative)
        if name.split(".")[0] in IO_MODULES
        or (
            _project_module(name) is not None
            and not _allowed_for_pure(name)
            and not any(name == e or name.startswith(e + ".") for e in FORWARDER_EXTRA)
        )
    ]
    assert not bad, f"{relative} imports {sorted(set(bad))}"
    assert not [
        n for n in _imports(ROOT / "anchor_node/sessions.py") if n.split(".")[0] in IO_MODULES
    ]
