"""The shape of the code, read from its source: one home for a job's status changes, and no
import cycles between the packages (a cycle makes import order matter and hides which layer
depends on which)."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("api", "posegen", "db", "worker")
LIFECYCLE = "posegen.lifecycle"
# An UPDATE of the generations table spelled in SQL text, setting its status.
RAW_STATUS_UPDATE = re.compile(r"update\s+generations\s+set\b[^;]*\bstatus\b", re.I | re.S)


def modules() -> dict[str, Path]:
    """Every module of the packages by its dotted name (a package by its own name)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def parsed() -> Iterator[tuple[str, Path, ast.Module]]:
    for name, path in modules().items():
        yield name, path, ast.parse(path.read_text(), filename=str(path))


# -- status writes -------------------------------------------------------------------------


def _updates_generations(call: ast.Call) -> bool:
    """Whether `call` is `<...>.values(...)` on a statement built from `update(Generation)`."""
    node: ast.expr = call.func
    while isinstance(node, ast.Attribute | ast.Call):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name == "update" and node.args and "Generation" in ast.unparse(node.args[0]):
                return True
            node = func
        else:
            node = node.value
    return False


def _sets_status(call: ast.Call) -> bool:
    if any(keyword.arg == "status" for keyword in call.keywords):
        return True
    return any(
        isinstance(arg, ast.Dict)
        and any(isinstance(k, ast.Constant) and k.value == "status" for k in arg.keys)
        for arg in call.args
    )


def status_writes(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """(line, source) of each statement in `tree` that changes a job's status."""
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "values"
            and _updates_generations(node)
            and _sets_status(node)
        ):
            yield node.lineno, ast.unparse(node.func)
        elif isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if (
                    isinstance(target, ast.Attribute)
                    and target.attr == "status"
                    and re.search(r"job|generation", ast.unparse(target.value), re.I)
                ):
                    yield node.lineno, ast.unparse(target)
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and RAW_STATUS_UPDATE.search(node.value)
        ):
            yield node.lineno, node.value[:60]


def test_only_lifecycle_changes_a_jobs_status() -> None:
    outside = [
        f"{path.relative_to(ROOT)}:{line}: {source}"
        for name, path, tree in parsed()
        if name != LIFECYCLE
        for line, source in status_writes(tree)
    ]
    assert outside == [], "a job's status changes only in posegen/lifecycle.py:\n" + "\n".join(
        outside
    )
    # The search finds the transitions where they are (it is not blind).
    lifecycle = ast.parse(modules()[LIFECYCLE].read_text())
    assert len(list(status_writes(lifecycle))) >= 6


# -- import cycles -------------------------------------------------------------------------


def imports(name: str, path: Path, tree: ast.Module, known: dict[str, Path]) -> set[str]:
    """The modules of the packages that `name` imports anywhere: at module level, inside
    functions, and under TYPE_CHECKING."""

    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str | None] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(resolve(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            # `from posegen import jobs` imports the module posegen.jobs.
            found.update(resolve(f"{base}.{alias.name}") for alias in node.names)
    found.discard(None)
    found.discard(name)
    return {module for module in found if module is not None}


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, tree, known) for name, path, tree in parsed()}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for module in graph.get(todo.pop(), set()) - seen:
            seen.add(module)
            todo.append(module)
    return seen


def test_the_packages_import_one_another_without_cycles() -> None:
    graph = import_graph()
    # Sanity: the graph holds the edges it should (function-level ones included).
    assert "posegen.lifecycle" in graph["worker.runner"]
    assert "worker.runner" in graph["worker.tasks"]  # imported inside the task's function
    reach = {module: reachable(graph, module) for module in graph}
    # Each group of modules that import one another, directly or through others.
    cycles = {
        tuple(sorted({module} | {other for other in reach[module] if module in reach[other]}))
        for module in graph
        if module in reach[module]
    }
    assert sorted(cycles) == []


# -- test isolation ------------------------------------------------------------------------

# The one module that names the test Redis server's databases: it lends them, one holder at a
# time (`RedisDatabases`, through the `broker_url` and `quiet_broker_url` fixtures). A number
# picked anywhere else is one two modules can pick alike, and their queues then mix.
REDIS_LENDER = ROOT / "tests" / "services.py"
REDIS_URL_WITH_DB = re.compile(r"redis://[^\s'\"]*/\d+")


def redis_db_numbers(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """(line, source) of each place in `tree` that picks a Redis database itself: a URL ending
    in a number, the server's URL to build one from, `redis_db(n)`, `db=n`, `select(n)`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if REDIS_URL_WITH_DB.fullmatch(node.value.strip()):
                yield node.lineno, node.value
        elif isinstance(node, ast.JoinedStr):
            if REDIS_URL_WITH_DB.search(ast.unparse(node)):
                yield node.lineno, ast.unparse(node)
        elif isinstance(node, ast.Name) and node.id == "REDIS_SERVER":
            yield node.lineno, node.id
        elif isinstance(node, ast.ImportFrom):
            if any(alias.name in ("REDIS_SERVER", "redis_db") for alias in node.names):
                yield node.lineno, ast.unparse(node)
        elif isinstance(node, ast.Call) and _picks_a_number(node):
            yield node.lineno, ast.unparse(node)


def _picks_a_number(call: ast.Call) -> bool:
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    numbered = any(isinstance(a, ast.Constant) and isinstance(a.value, int) for a in call.args)
    return (
        name == "redis_db"
        or (name == "select" and numbered)
        or any(k.arg == "db" for k in call.keywords)
    )


def test_no_test_module_picks_a_redis_database_number() -> None:
    picked = [
        f"{path.relative_to(ROOT)}:{line}: {source}"
        for path in sorted((ROOT / "tests").rglob("*.py"))
        if path != REDIS_LENDER
        for line, source in redis_db_numbers(ast.parse(path.read_text(), filename=str(path)))
    ]
    assert picked == [], (
        "take a Redis database from the `broker_url` or `quiet_broker_url` fixture:\n"
        + "\n".join(picked)
    )
    # The search finds each way of picking one (it is not blind).
    picks = """
from tests.services import redis_db
a = redis_db(8)
b = "redis://127.0.0.1:6379/8"
b2 = f"redis://127.0.0.1:{port}/8"
c = f"{REDIS_SERVER}/8"
d = redis.Redis(port=6379, db=8)
e.select(8)
"""
    assert len(list(redis_db_numbers(ast.parse(picks)))) == 7
