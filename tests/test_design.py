"""docs/design.md's module table against the code: a row for every module of distnet/, and its
"depends on" naming exactly the distnet modules it imports (anywhere in it, lazy imports too);
the import graph of distnet/ without a cycle."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "distnet"


def module_name(path: Path) -> str:
    """distnet/report/runs.py -> report.runs; distnet/report/__init__.py -> report."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """module -> the distnet modules it imports."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        if not name:
            continue  # distnet/__init__.py
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "distnet":
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("distnet."):
                found.add(node.module.removeprefix("distnet."))
            elif isinstance(node, ast.Import):
                found |= {a.name.removeprefix("distnet.") for a in node.names if a.name.startswith("distnet.")}
        out[name] = found - {name}
    return out


def documented(modules: set[str]) -> dict[str, set[str]]:
    """The module table's rows: module -> the distnet modules its "depends on" names."""
    text = (ROOT / "docs" / "design.md").read_text()
    section = text[text.index("## Modules"):text.index("## How a config flows")]
    rows = {}
    for path, deps in re.findall(r"^\| `([\w/]+(?:\.py|/))` \|.*\| ([^|]*) \|$", section, re.M):
        name = path.removesuffix(".py").removesuffix("/").replace("/", ".")
        rows[name] = {d.strip() for d in re.split(r"[,;]", deps)} & modules
    return rows


def test_the_module_table_says_what_each_module_imports():
    code = imports()
    doc = documented(set(code))
    assert set(doc) == set(code), f"no row: {sorted(set(code) - set(doc))}; no module: {sorted(set(doc) - set(code))}"
    wrong = {m: {"table": sorted(doc[m]), "code": sorted(code[m])} for m in code if doc[m] != code[m]}
    assert not wrong, wrong


def test_the_import_graph_has_no_cycle():
    graph = imports()
    done, path = set(), []

    def visit(m):
        assert m not in path, "cycle: " + " -> ".join(path[path.index(m):] + [m])
        if m in done:
            return
        path.append(m)
        for d in graph.get(m, ()):
            visit(d)
        path.pop()
        done.add(m)

    for m in graph:
        visit(m)
