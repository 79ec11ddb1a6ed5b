"""The import graph's rules, read from the source (docs/ARCHITECTURE.md).

- Layers: ``keel`` at the bottom; ``upgrade`` and ``observability`` on it;
  ``agent`` above those; ``shim`` above the agent; ``opsd`` on top.  A
  package imports only packages below it, so there are no cycles.
- ``agent``, ``shim`` and ``opsd`` are reached from another package only
  through their ``api`` module (and the agent's command, ``agent.__main__``,
  which the shim's launcher runs in a forked child).
- Nobody imports a private module of another package, nor a private name
  (``_x``) from another module.

Every ``import`` counts, also those inside functions; strings do not
(a script that runs in the guest or in another release's interpreter is
not an import of this tree).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: Each package and the packages it may import.
MAY_IMPORT: dict[str, frozenset[str]] = {
    "keel": frozenset(),
    "observability": frozenset({"keel"}),
    "upgrade": frozenset({"keel"}),
    "agent": frozenset({"keel", "upgrade", "observability"}),
    "shim": frozenset({"keel", "upgrade", "observability", "agent"}),
    "opsd": frozenset({"keel", "upgrade", "observability", "agent", "shim"}),
}
#: Modules of these packages that other packages may import.
PUBLIC_ENTRY = {
    "agent": ("agent.api", "agent.__main__"),
    "shim": ("shim.api",),
    "opsd": ("opsd.api",),
}


def _imports(tree: ast.AST, module: str, is_package: bool
             ) -> Iterator[tuple[int, str, str | None]]:
    """(line, imported module, imported name or None) for every import."""
    package = module.split(".")[0]
    here = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = here[: len(here) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or package
            for alias in node.names:
                yield node.lineno, target, alias.name


def _is_module(dotted: str) -> bool:
    """True if *dotted* names a module of this tree (``from pkg import _mod``)."""
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """What *source*, the text of *module* ("shim.sandbox"), breaks."""
    package = module.split(".")[0]
    # Private names may come from this module's own packages (a private
    # submodule, a package-internal helper), never from a sibling module.
    own = {".".join(module.split(".")[:n]) for n in range(1, module.count(".") + 2)}
    out = []
    for line, target, name in _imports(ast.parse(source), module, is_package):
        top = target.split(".")[0]
        where = f"{module}:{line}"
        if top in MAY_IMPORT and top != package:
            if top not in MAY_IMPORT[package]:
                out.append(f"{where}: {package} may not import {top} ({target})")
            elif top in PUBLIC_ENTRY and not any(
                    target == m or target.startswith(m + ".") for m in PUBLIC_ENTRY[top]):
                out.append(f"{where}: {target} is internal to {top}; use "
                           f"{' or '.join(PUBLIC_ENTRY[top])}")
            elif any(part.startswith("_") and not part.startswith("__")
                     for part in target.split(".")[1:]):
                out.append(f"{where}: {target} is a private module of {top}")
        if (name is not None and name.startswith("_") and not name.startswith("__")
                and target not in own and not _is_module(f"{target}.{name}")):
            out.append(f"{where}: private name {name} imported from {target}")
    return out


def _modules() -> Iterator[tuple[str, Path, bool]]:
    for package in MAY_IMPORT:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            if "_pb" in rel.parts:
                continue  # generated
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            yield ".".join(parts), path, rel.name == "__init__"


def test_every_package_keeps_to_its_layer() -> None:
    found = [v for module, path, is_package in _modules()
             for v in violations(path.read_text(), module, is_package)]
    assert found == [], "\n".join(found)


def test_the_scan_sees_every_package() -> None:
    seen = {module.split(".")[0] for module, _, _ in _modules()}
    assert seen == set(MAY_IMPORT)


@pytest.mark.parametrize(("module", "source", "why"), [
    ("keel.errors", "import shim.sandbox", "keel may not import shim"),
    ("agent.service", "from shim.api import SandboxDir", "agent may not import shim"),
    ("upgrade.store", "def f():\n    from agent import api", "upgrade may not import agent"),
    ("opsd.cli", "from shim.sandbox import Sandbox", "shim.sandbox is internal to shim"),
    ("shim.sandbox", "import agent._core", "agent._core is internal to agent"),
    ("shim.service", "from upgrade._install import run", "private module of upgrade"),
    ("shim.sandbox", "from shim._agentconn import _DialChannel", "private name _DialChannel"),
])
def test_a_forbidden_import_is_reported(module: str, source: str, why: str) -> None:
    found = violations(source, module)
    assert len(found) == 1 and why in found[0], found


@pytest.mark.parametrize(("module", "source"), [
    ("shim.sandbox", "from agent.api import pb"),
    ("shim._launcher", "from agent.__main__ import main"),
    ("opsd._discovery", "from shim.api import SandboxDir"),
    ("shim.vmm.qemu", "from . import _net"),
    ("shim.sandbox", "from shim._process import Process"),
    ("agent.state", "from upgrade.store import StateStore"),
    ("shim.vmm.qemu._preload", "SCRIPT = 'from agent._vmguest import preload'"),
])
def test_allowed_imports_pass(module: str, source: str) -> None:
    assert violations(source, module, is_package=module == "shim.vmm.qemu") == []
