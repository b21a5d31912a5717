"""The layering rules of docs/architecture.md, checked statically over every .py file's imports.

- `nord/` never imports `node` or `coordinator`, nor FastAPI, uvicorn or starlette;
- in the shipped packages (nord, node, coordinator) only `nord/transport.py` (or a `nord/transport/`
  package) imports hivemind;
- nothing anywhere imports `libp2p` or `crdt_merge`, and pyproject.toml lists neither.

Imports are read with `ast` (top-level or inside functions, absolute or relative, and constant-string
`importlib.import_module` / `__import__` calls), so the check never runs the code it inspects.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIPPED_DIRS = {".git", ".venv", "venv", "build", "dist", "node_modules", "__pycache__", ".ruff_cache"}
SHIPPED = {"nord", "node", "coordinator"}
FORBIDDEN_EVERYWHERE = {"libp2p", "crdt_merge"}
FORBIDDEN_IN_NORD = {"node", "coordinator", "fastapi", "uvicorn", "starlette"}
FORBIDDEN_REQUIREMENTS = {"libp2p", "crdt-merge"}


def python_files(root: Path) -> list[Path]:
    return sorted(
        p
        for p in root.rglob("*.py")
        if not any(part in SKIPPED_DIRS or part.endswith(".egg-info") for part in p.relative_to(root).parts)
    )


def imported_modules(source: str, rel: Path) -> set[str]:
    """Dotted names of every module `source` (the file at repo-relative `rel`) imports."""
    package = list(rel.with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(source, filename=str(rel))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: max(0, len(package) - node.level + 1)] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names if not node.module)
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id == "__import__")
            )
        ):
            found.add(node.args[0].value)
    return {m for m in found if m}


def layering_violations(root: Path) -> list[str]:
    """One line per forbidden import found under `root` (a repository checkout)."""
    problems = []
    for path in python_files(root):
        rel = path.relative_to(root)
        tops = {m.split(".")[0] for m in imported_modules(path.read_text(encoding="utf-8"), rel)}
        in_transport = rel == Path("nord/transport.py") or rel.parts[:2] == ("nord", "transport")
        for top in sorted(tops & FORBIDDEN_EVERYWHERE):
            problems.append(f"{rel} imports {top} (not a Nord dependency)")
        if rel.parts[0] == "nord":
            for top in sorted(tops & FORBIDDEN_IN_NORD):
                problems.append(f"{rel} imports {top} (nord/ must not depend on apps or web frameworks)")
        if rel.parts[0] in SHIPPED and "hivemind" in tops and not in_transport:
            problems.append(f"{rel} imports hivemind (only nord/transport may)")
    return problems


def _load_toml(path: Path) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads(path.read_text(encoding="utf-8"))


def requirement_violations(pyproject: Path) -> list[str]:
    """Forbidden distributions named in build requires, dependencies or any optional extra."""
    doc = _load_toml(pyproject)
    project = doc.get("project", {})
    requirements = list(doc.get("build-system", {}).get("requires", []))
    requirements += project.get("dependencies", [])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    problems = []
    for req in requirements:
        name = re.split(r"[\s\[<>=!~;@(]", req.strip(), maxsplit=1)[0]
        if re.sub(r"[-_.]+", "-", name).lower() in FORBIDDEN_REQUIREMENTS:
            problems.append(f"pyproject.toml requires {req!r}")
    return problems


def test_repository_follows_the_layering_rules():
    assert python_files(REPO), "no Python files found: is REPO right?"
    assert layering_violations(REPO) == []


def test_pyproject_lists_no_forbidden_dependency():
    assert requirement_violations(REPO / "pyproject.toml") == []


@pytest.mark.parametrize(
    "rel,source,expected",
    [
        ("nord/model.py", "import node.worker\n", "nord/model.py imports node"),
        ("nord/model.py", "def f():\n    from coordinator import api\n", "imports coordinator"),
        ("nord/codec/x.py", "from ...coordinator import api\n", "imports coordinator"),
        ("nord/web.py", "from fastapi import FastAPI\n", "imports fastapi"),
        ("nord/web.py", "import starlette.routing\n", "imports starlette"),
        ("nord/web.py", "import importlib\nimportlib.import_module('uvicorn')\n", "imports uvicorn"),
        ("nord/crdt/log.py", "from hivemind import DHT\n", "imports hivemind"),
        ("node/worker.py", "import hivemind.p2p\n", "node/worker.py imports hivemind"),
        ("tests/test_x.py", "import libp2p\n", "imports libp2p"),
        ("bench/b.py", "from crdt_merge import merge\n", "imports crdt_merge"),
    ],
)
def test_layering_check_catches_each_violation(tmp_path, rel, source, expected):
    target = tmp_path / rel
    target.parent.mkdir(parents=True)
    target.write_text(source)
    problems = layering_violations(tmp_path)
    assert len(problems) == 1 and expected in problems[0]


def test_layering_check_allows_what_the_rules_allow(tmp_path):
    allowed = {
        "nord/transport.py": "import hivemind\n",
        "nord/transport/dht.py": "from hivemind.dht import DHT\n",
        "nord/train.py": "from . import data\nfrom .crdt import Replica\nimport nord.codec\n",
        "coordinator/api.py": "from fastapi import FastAPI\nfrom nord import transport\n",
        "tests/nord/test_transport.py": "from hivemind.p2p import PeerID\n",
        "nord.egg-info/x.py": "import libp2p\n",
    }
    for rel, source in allowed.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(source)
    assert layering_violations(tmp_path) == []


@pytest.mark.parametrize(
    "requirement", ["libp2p>=0.2", "crdt_merge", "CRDT.Merge==1.0", "libp2p[quic] ; python_version>'3.9'"]
)
@pytest.mark.parametrize("table", ["dependencies", "optional"])
def test_requirement_check_catches_forbidden_packages(tmp_path, requirement, table):
    entry = (
        f"dependencies = [{requirement!r}]"
        if table == "dependencies"
        else f"dependencies = []\n[project.optional-dependencies]\np2p = [{requirement!r}]"
    )
    (tmp_path / "pyproject.toml").write_text(f'[project]\nname = "x"\n{entry}\n')
    assert len(requirement_violations(tmp_path / "pyproject.toml")) == 1
