"""The module graph of the installed package: dependencies point one way, without cycles, and no module imports
another's private names.

Layers, lowest first (a module imports its own layer, without a cycle, or lower ones):

    base          quant, options, config, tokenizer, chat format, the disk KV block store
    backends      the backend contract, dispatch, registry, reference ops, the built-in per-op backends and kernels
    model         the reference model (flashport.model)
    readers       checkpoint and bundle readers, bundle signatures
    loader        one entrance for every format (flashport.loader)
    services      what works on an opened model: the KV runtime, expert offload, expert parallelism, and the
                  backends that need the model (ONNX export and the whole-step ONNX Runtime backend, the
                  conformance kit and `--explain`)
    engine        the engine and its factory (flashport.engine)
    sessions      chat sessions and the continuous-batching scheduler
    server        the OpenAI-compatible server and the terminal chat
    public        the package's re-exports (`flashport.load_engine`, `flashport.Engine`, the option records)
    tools         export/ and bench/: they import the runtime; the runtime never imports them
    entrances     the CLI

Every import counts, at module level or inside a function: an import hidden in a function is still a dependency.
"""

import ast
import fnmatch
import importlib
import importlib.util
import pkgutil

import pytest

LAYERS = [
    ("base", ["flashport.quant", "flashport.quant.*", "flashport.options", "flashport.config",
              "flashport.tokenizer", "flashport.chat", "flashport.kvstore"]),
    ("backends", ["flashport.backends", "flashport.backends.contract", "flashport.backends.dispatch",
                  "flashport.backends.registry", "flashport.backends.reference", "flashport.backends.torch_backend",
                  "flashport.backends.torch_fast", "flashport.backends.cpu_quant", "flashport.backends.cpu_build",
                  "flashport.backends.indexer_fp4",
                  "flashport.kernels", "flashport.kernels.*"]),
    ("model", ["flashport.model"]),
    ("readers", ["flashport.checkpoint", "flashport.bundle", "flashport.signing"]),
    ("loader", ["flashport.loader"]),
    ("services", ["flashport.kv", "flashport.kv.*", "flashport.offload", "flashport.distributed",
                  "flashport.backends.onnx_export", "flashport.backends.onnx_backend",
                  "flashport.backends.conformance", "flashport.backends.explain", "flashport.backends.pytest_plugin"]),
    ("engine", ["flashport.engine"]),
    ("sessions", ["flashport.session", "flashport.scheduler"]),
    ("server", ["flashport.server", "flashport.chat_cli"]),
    ("public surface", ["flashport"]),
    ("tools", ["flashport.export", "flashport.export.*", "flashport.bench", "flashport.bench.*"]),
    ("entrances", ["flashport.cli", "flashport.cli_args", "flashport.bench_cli"]),
]
SUBPACKAGES = ["flashport", "flashport.backends", "flashport.export", "flashport.kernels", "flashport.quant",
               "flashport.bench"]


def layer_of(module: str) -> int:
    for i, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layering.py")


def modules() -> dict[str, tuple[str, bool]]:
    """Every module of the installed package -> (source file, is a package)."""
    out = {}
    for pkg in SUBPACKAGES:
        mod = importlib.import_module(pkg)
        out[pkg] = (mod.__file__, True)
        for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
            spec = importlib.util.find_spec(info.name)
            if spec.origin and spec.origin.endswith(".py"):
                out[info.name] = (spec.origin, spec.submodule_search_locations is not None)
    return out


def imports(name: str, origin: str, is_pkg: bool, known: set[str]) -> tuple[set[str], list[str]]:
    """(flashport modules `name` imports, private names it takes from other flashport modules)."""
    tree = ast.parse(open(origin, encoding="utf-8").read(), origin)
    pkg = name if is_pkg else name.rpartition(".")[0]
    deps, private, aliases = set(), [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod != "flashport" and not mod.startswith("flashport."):
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                if sub in known:
                    deps.add(sub)
                    aliases[a.asname or a.name] = sub
                else:
                    deps.add(mod)
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        private.append(f"from {mod} import {a.name}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("flashport"):
                    deps.add(a.name)
                    if a.asname:
                        aliases[a.asname] = a.name
    for node in ast.walk(tree):  # module._private through an imported flashport module
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                and node.attr.startswith("_") and not node.attr.startswith("__"):
            private.append(f"{aliases[node.value.id]}.{node.attr}")
    deps.discard(name)
    return deps, private


@pytest.fixture(scope="module")
def graph():
    mods = modules()
    known = set(mods)
    g, private = {}, {}
    for name, (origin, is_pkg) in mods.items():
        deps, priv = imports(name, origin, is_pkg, known)
        g[name] = {d for d in deps if d in known}
        if priv:
            private[name] = priv
    return g, private


def test_every_module_has_a_layer(graph):
    g, _ = graph
    for name in g:
        layer_of(name)


def test_no_upward_import(graph):
    g, _ = graph
    bad = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
           for m, deps in sorted(g.items()) for d in sorted(deps) if layer_of(d) > layer_of(m)]
    assert not bad, "\n".join(bad)


def test_runtime_never_imports_export_or_bench(graph):
    g, _ = graph
    tools = next(i for i, (n, _) in enumerate(LAYERS) if n == "tools")
    bad = [f"{m} imports {d}" for m, deps in sorted(g.items()) if layer_of(m) < tools
           for d in sorted(deps) if d.startswith(("flashport.export", "flashport.bench"))]
    assert not bad, "\n".join(bad)


def test_no_import_cycles(graph):
    g, _ = graph
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
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
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_no_private_names_across_modules(graph):
    _, private = graph
    assert not private, private


def test_the_checks_can_fail():
    """The walker sees function-local imports, relative imports and private attribute access."""
    import tempfile
    from pathlib import Path

    src = "def f():\n    from ..backends import registry\n    return registry._load('x')\nfrom ..engine import _x\n"
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.py"
        p.write_text(src)
        deps, private = imports("flashport.kv.m", str(p), False,
                                {"flashport.backends", "flashport.backends.registry", "flashport.engine"})
    assert deps == {"flashport.backends.registry", "flashport.engine"}
    assert private == ["from flashport.engine import _x", "flashport.backends.registry._load"]
    assert layer_of("flashport.engine") > layer_of("flashport.kv.m")  # kv importing the engine is upward
