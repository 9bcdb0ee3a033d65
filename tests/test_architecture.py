"""The house rules of docs/ARCHITECTURE.md, checked on the source: each module imports only from its own layer or
the layers before it; no module over 400 lines, no function over 60 (the argparse builder aside)."""

import ast
import pathlib

from .conftest import REPO

PKG = pathlib.Path(REPO) / "ra3_jax"

# docs/ARCHITECTURE.md's layer table, in order (a path prefix ending in "/" is a package).
LAYERS = [
    ("leaves", ["errors", "hostmem", "schema", "sharding", "meshes", "distributed", "train/checkpoint", "__init__"]),
    ("model", ["model/", "tokenizer"]),
    ("config", ["config"]),
    ("data", ["data/"]),
    ("compute", ["objectives/", "sampling", "stop_strings", "sampler", "execution/"]),
    ("evaluation", ["evaluation/"]),
    ("training core", ["train/"]),
    ("algorithms", ["algorithms/"]),
    ("experiments", ["experiments/"]),
    ("cli", ["commands", "cli"]),
]


def layer_of(module: str) -> int:
    """Layer index of a dotted module under ra3_jax (the most specific prefix wins)."""
    path = module.removeprefix("ra3_jax").lstrip(".").replace(".", "/") or "__init__"
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            hit = (path + "/").startswith(p) if p.endswith("/") else (path == p or path.startswith(p + "/"))
            if hit and len(p) > best_len:
                best, best_len = i, len(p)
    assert best is not None, f"{module} is in no layer of docs/ARCHITECTURE.md"
    return best


def _module_name(f: pathlib.Path) -> str:
    parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(f: pathlib.Path, module: str):
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            pkg = module.split(".") if f.name == "__init__.py" else module.split(".")[:-1]
            pkg = pkg[: len(pkg) - (node.level - 1)]
            yield ".".join(pkg + ([node.module] if node.module else []))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ra3_jax"):
            yield node.module
            if node.module == "ra3_jax":  # `from ra3_jax import sharding`: the submodules named
                yield from (f"ra3_jax.{a.name}" for a in node.names if (PKG / f"{a.name}.py").exists() or (PKG / a.name).is_dir())
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("ra3_jax"))


def test_layer_order():
    bad = []
    for f in sorted(PKG.rglob("*.py")):
        module = _module_name(f)
        me = layer_of(module)
        for target in _imports(f, module):
            if target != "ra3_jax" and layer_of(target) > me:
                bad.append(f"{module} ({LAYERS[me][0]}) imports {target} ({LAYERS[layer_of(target)][0]})")
    assert not bad, "\n".join(bad)


def test_layer_check_catches_an_upward_import():
    assert layer_of("ra3_jax.train.loop") > layer_of("ra3_jax.sampler") > layer_of("ra3_jax.config")
    assert layer_of("ra3_jax.train.checkpoint") == 0 and layer_of("ra3_jax.algorithms.ra3.em") == 7
    assert layer_of("ra3_jax") == 0


def test_module_and_function_sizes():
    big = []
    for f in sorted(PKG.rglob("*.py")):
        src = f.read_text()
        if src.count("\n") > 400:
            big.append(f"{f.relative_to(PKG)}: {src.count(chr(10))} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != "build_parser":
                if node.end_lineno - node.lineno >= 60:
                    big.append(f"{f.relative_to(PKG)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not big, "\n".join(big)
