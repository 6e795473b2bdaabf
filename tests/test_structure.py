"""The package's import graph: no circles, and every import points down the layer order below.

Parsed with ast from the source (every `import` / `from ... import` in a module, at any depth,
function-level ones included), so a circle hidden inside a function is caught too.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "scope_jax"

# The layer order, low to high: a module may import only modules listed before it (and the
# package's own submodules' __init__ may import its children). Written once, here.
#   * algorithms sits below config: config.py validates config.algo against algorithms.ALGORITHMS.
#   * config sits above sampling: its packing check needs sampling.prompt_bucket.
#   * engine is the continuous-batching rollout engine (another branch); listed so it lands in place.
#   * verifiers: result (VerifyResult) < math, code_harness < code < pool: the pool dispatches
#     each item to math or code by its gold, so it sits above both, and neither imports the other.
ORDER = [
    "losses",
    "sharding",
    "models.attention", "models.model", "models.hf", "models",
    "sampling",
    "engine",
    "rollout",
    "packing",
    "algorithms",
    "config",
    "scoring",
    "step",
    "verifiers.result", "verifiers.math", "verifiers.code_harness", "verifiers.code", "verifiers.pool",
    "verifiers",
    "benchmarks",
    "data",
    "teacher",
    "compat",
    "tracking",
    "checkpoint",
    "evaluation",
    "collect",
    "toy",
    "serve",
    "train",
]
RANK = {name: i for i, name in enumerate(ORDER)}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> list[tuple[str, int]]:
    """(imported package module, line) for every import of scope_jax.* in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from scope_jax.verifiers import code` imports the module scope_jax.verifiers.code
            # (its package's __init__ runs first, as for any submodule: not counted as an edge);
            # `from scope_jax.sampling import stop_ids` imports scope_jax.sampling.
            subs = [f"{node.module}.{a.name}" for a in node.names]
            names = [s for s in subs if s[len("scope_jax."):] in RANK] or [node.module]
        else:
            continue
        for name in names:
            if name == "scope_jax" or not name.startswith("scope_jax."):
                continue
            mod = name[len("scope_jax."):]
            while mod and mod not in RANK:  # scope_jax.models.hf.load_hf -> models.hf
                mod = mod.rpartition(".")[0]
            if mod:
                out.append((mod, node.lineno))
    return out


def _graph() -> dict[str, list[tuple[str, int]]]:
    return {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_is_placed_in_the_order():
    missing = sorted(set(_graph()) - set(RANK) - {""})
    assert not missing, f"modules missing from ORDER in tests/test_structure.py: {missing}"


def test_imports_point_down_the_order():
    upward = []
    for mod, imports in _graph().items():
        for target, line in imports:
            if target == mod or (mod and target.startswith(mod + ".")):  # a package's own children
                continue
            if mod == "" or RANK[target] >= RANK[mod]:
                upward.append(f"scope_jax/{mod.replace('.', '/') or '__init__'}.py:{line} imports {target}")
    assert not upward, "imports of a module at or above the importer's layer:\n" + "\n".join(upward)


def test_no_import_circles():
    graph = {m: {t for t, _ in imps if t != m and not t.startswith(m + ".")} for m, imps in _graph().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m, path):
        if state.get(m) == 1:
            pytest.fail("import circle: " + " -> ".join(path[path.index(m):] + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            visit(t, path + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])


def test_no_function_level_imports_of_the_package():
    """Imports of scope_jax modules sit at the top of a module; one inside a function must say
    why on its line (an optional dependency: "# optional: ...")."""
    hidden = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines), str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in inner.names] if isinstance(inner, ast.Import) else [inner.module or ""]
                    if any(n.startswith("scope_jax") for n in names) and "# optional" not in lines[inner.lineno - 1]:
                        hidden.append(f"{path.relative_to(PACKAGE.parent)}:{inner.lineno}")
    assert not hidden, "function-level imports of the package (move them to the top):\n" + "\n".join(hidden)


def test_the_checks_catch_what_they_look_for(tmp_path, monkeypatch):
    """The graph walk sees function-level imports, and an upward one is reported."""
    pkg = tmp_path / "scope_jax"
    pkg.mkdir()
    (pkg / "losses.py").write_text("def f():\n    from scope_jax import train\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    assert _graph()["losses"] == [("train", 2)]
    with pytest.raises(AssertionError, match="losses.py:2 imports train"):
        test_imports_point_down_the_order()
    with pytest.raises(AssertionError, match="scope_jax/losses.py:2"):
        test_no_function_level_imports_of_the_package()
