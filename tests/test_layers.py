"""The import graph of visalign/, read from the code (ast): layers point down, and no circle (function-level
imports counted).

Layers, from the bottom (DESIGN.md): core (registry, types, config, errors, files, coercion, images, and
the shipped prompt_sets) -> models -> objectives, rewards -> data, train, eval -> worlds -> cli, demo. An
import of a higher layer, at module level or inside a function, is an upward arrow; there are none, and
KNOWN_UPWARD (empty since the house redesign, issue #21) is where a deliberate exception would have to be
argued. Scripts use visalign's public names only.
"""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "visalign"
LAYERS = {"images": 0, "model_folders": 0, "seeds": 0, "registry": 0, "types": 0, "config": 0, "errors": 0, "files": 0,
          "coercion": 0, "__init__": 0,
          "models": 1, "objectives": 2, "rewards": 2, "data": 3, "train": 3, "eval": 3,
          "worlds": 4, "prompt_sets": 0, "cli": 5, "commands": 5, "demo": 5, "__main__": 5}

KNOWN_UPWARD: set[tuple[str, str]] = set()


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1] if len(parts) > 1 else "__init__", 0)


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        pkg = importer.split(".") if is_package else importer.split(".")[:-1]
        pkg = pkg[: len(pkg) - node.level + 1]
        base = ".".join(pkg + ([node.module] if node.module else []))
    out = []
    for alias in node.names:
        candidate = f"{base}.{alias.name}"
        as_module = PKG.parent / Path(*candidate.split("."))
        out.append(candidate if as_module.with_suffix(".py").exists() or as_module.is_dir() else base)
    return out


def imports() -> list[tuple[str, str, bool]]:
    """(importer, imported, at module level) for every import of a visalign module by a visalign module."""
    edges = []
    for path in PKG.rglob("*.py"):
        importer, tree = _module_name(path), ast.parse(path.read_text())
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                targets = _resolve(importer, path.name == "__init__.py", node)
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            edges += [(importer, t, id(node) in top) for t in targets if t.startswith("visalign")]
    return edges


def test_layers_only_point_down_except_the_listed_debt():
    upward = {(a, b) for a, b, _ in imports() if layer(b) > layer(a) and not b.startswith(a + ".")}
    new = sorted(upward - KNOWN_UPWARD)
    assert not new, f"new upward imports (import from a lower layer, or move the code down): {new}"
    gone = sorted(KNOWN_UPWARD - upward)
    assert not gone, f"fixed: remove these from KNOWN_UPWARD: {gone}"


def test_no_import_circle_even_through_function_level_imports():
    """A lazy import that only hides a circle is still a circle: every import counts, at module level or
    inside a function (a true optional dependency is a third-party package, never a visalign module)."""
    graph: dict[str, set[str]] = {}
    for a, b, _top in imports():
        if a != b:
            graph.setdefault(a, set()).add(b)
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            sccs.append(comp)

    for v in list(graph):
        if v not in index:
            visit(v)
    circles = [sorted(c) for c in sccs if len(c) > 1]
    # a package importing its own submodules for re-export is not a circle between layers
    circles = [c for c in circles if not all(m.startswith(c[0].rsplit(".", 1)[0]) for m in c) or len(c) > 2]
    assert not circles, f"import circles: {circles}"


def test_only_the_models_layer_names_diffusers_model_classes():
    """Model, pipeline, scheduler and autoencoder classes of diffusers appear only in visalign/models (training
    utilities such as EMAModel or get_scheduler may be used anywhere)."""
    offenders = []
    for path in PKG.rglob("*.py"):
        if path.relative_to(PKG).parts[0] == "models":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "diffusers":
                for alias in node.names:
                    if alias.name.endswith(("Model", "Pipeline", "Scheduler")) or alias.name.startswith("Autoencoder"):
                        offenders.append(f"{path.relative_to(PKG)}: {alias.name}")
    assert offenders == []


def test_scripts_use_only_public_names_and_not_the_tests():
    """scripts/ import no private visalign name and do not put tests/ on the path (they are examples to copy)."""
    offenders = []
    for path in sorted((PKG.parent / "scripts").glob("*.py")):
        text = path.read_text()
        if '"tests"' in text or "'tests'" in text:
            offenders.append(f"{path.name}: puts tests/ on the path")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("visalign"):
                offenders += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not offenders, offenders


IMPORT_ALONE = """
import importlib, os, sys
import numpy, torch  # third-party libraries only: each child below imports visalign afresh
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
            os._exit(0)
        except BaseException as e:
            sys.stderr.write(f"{name}: {type(e).__name__}: {e}\\n")
            os._exit(1)
    if os.waitpid(pid, 0)[1]:
        failed.append(name)
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_alone_first():
    """Each module of visalign/ imported first and alone (a forked child of an interpreter that has loaded only
    third-party libraries), so no import order hides a circle."""
    import subprocess
    import sys

    names = sorted(_module_name(p) for p in PKG.rglob("*.py") if p.name != "__main__.py")  # that one runs the CLI
    assert len(names) > 90
    r = subprocess.run([sys.executable, "-c", IMPORT_ALONE, *names], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
