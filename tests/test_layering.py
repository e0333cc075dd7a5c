"""The package's architecture, checked on the source: imports only go downward through the layers
below, and constructors with more than three fields are called by keyword."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Lowest first. A module may import its own layer and the layers below it, never one above.
LAYERS = [
    # 0. utilities, data, sharding and the run's files and processes: no models, no methods
    ("mim_jax.config_lib", "mim_jax.config_defaults", "mim_jax.flops", "mim_jax.parallel", "mim_jax.data",
     "mim_jax.masking", "mim_jax.errors", "mim_jax.runtime"),
    # 1. Linen modules two or more methods share
    ("mim_jax.models",),
    # 2. weight specs and the layouts of other codebases (they read the models' param trees)
    ("mim_jax.weights",),
    # 3. the method interface and registry (concrete methods load by name, lazily)
    ("mim_jax.methods", "mim_jax.methods.base", "mim_jax.methods.masked"),
    # 4. trained weights of runs
    ("mim_jax.pretrained",),
    # 5. the methods, one folder each
    ("mim_jax.methods.*",),
    # 6. optimizer, train state and step; evaluators
    ("mim_jax.training", "mim_jax.evaluators"),
    # 7. the training loop, compiles for TPU slices, and the entry points
    ("mim_jax.training.train", "mim_jax.tpu", "mim_jax.bench", "mim_jax.main", "mim_jax.plot", "mim_jax.export",
     "mim_jax.visualize", "mim_jax.aot"),
]


def layer_of(module: str) -> int:
    """The layer of a mim_jax module: the most specific entry that names it or a package above it."""
    best, best_len = None, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if name.endswith(".*"):
                prefix = name[:-2]
                match = module.startswith(prefix + ".")
                length = len(prefix) + 1
            else:
                match = module == name or module.startswith(name + ".")
                length = len(name)
            if match and length > best_len:
                best, best_len = i, length
    return best


def modules():
    for path in sorted((ROOT / "mim_jax").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path


def imports_of(name: str, path: pathlib.Path):
    """Every mim_jax module imported anywhere in the file (function-level imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("mim_jax"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("mim_jax"):
                for alias in node.names:   # `from mim_jax import flops` imports the module mim_jax.flops
                    candidate = f"{base}.{alias.name}"
                    yield candidate if (ROOT / (candidate.replace(".", "/") + ".py")).exists() or \
                        (ROOT / candidate.replace(".", "/")).is_dir() else base


def test_every_module_has_a_layer():
    missing = [name for name, _ in modules() if name != "mim_jax" and layer_of(name) is None]
    assert not missing, f"place these modules in tests/test_layering.py LAYERS: {missing}"


def test_imports_only_go_downward():
    violations = []
    for name, path in modules():
        if name == "mim_jax":
            continue
        for imported in imports_of(name, path):
            if imported == "mim_jax":
                continue
            if layer_of(imported) > layer_of(name):
                violations.append(f"{name} (layer {layer_of(name)}) imports {imported} (layer {layer_of(imported)})")
    assert not violations, "\n".join(violations)


def test_the_rules_that_matter_most_hold():
    """Methods never import evaluators or the trainer; models are Linen modules that import no
    methods, evaluators or weight files."""
    for name, path in modules():
        imported = set(imports_of(name, path))
        if name.startswith("mim_jax.methods"):
            assert not {m for m in imported if m.startswith(("mim_jax.evaluators", "mim_jax.training"))}
        if name.startswith(("mim_jax.models", "mim_jax.weights")):
            assert not {m for m in imported if m.startswith("mim_jax.methods")}, name
        if name.startswith("mim_jax.models"):
            assert not {m for m in imported if m.startswith(("mim_jax.methods", "mim_jax.evaluators", "mim_jax.weights"))}


def _method_folder(module: str) -> str | None:
    """'capi' for mim_jax.methods.capi and everything in it; None outside the method folders."""
    parts = module.split(".")
    if len(parts) >= 3 and parts[:2] == ["mim_jax", "methods"] and (ROOT / "mim_jax/methods" / parts[2]).is_dir():
        return parts[2]
    return None


def test_a_method_is_one_folder():
    """What is private to a method lives in its folder and only that folder imports it; the one
    exception is the MAE baseline, which Beyond Masking and CMAE extend. Every registered method
    is its folder plus its config."""
    from mim_jax.methods import REGISTRY
    violations = []
    for name, path in modules():
        mine = _method_folder(name)
        for imported in imports_of(name, path):
            owner = _method_folder(imported)
            if owner is not None and owner != mine and not (owner == "mae" and mine is not None):
                violations.append(f"{name} imports {imported}, private to methods/{owner}/")
    assert not violations, "\n".join(violations)
    for method, target in REGISTRY.items():
        assert target.startswith(f"mim_jax.methods.{method}."), (method, target)
        assert (ROOT / "configs" / f"{method}.py").is_file(), f"no configs/{method}.py for the method {method!r}"


# Modules outside methods/ that one method folder alone imports, and why they stay where they are.
SHARED_THOUGH_ONE_FOLDER_IMPORTS_THEM = {
    "mim_jax.models.decoder": "MAE's pixel decoder, which Beyond Masking and CMAE inherit with MAE",
    "mim_jax.weights.clip": "the CLIP weight files (Hugging Face, OpenAI): a weight format, kept in weights/",
}


def test_no_method_private_module_outside_its_folder():
    """A module outside methods/ that exactly one method folder imports, and nothing else in the
    library, is that method's private code: it belongs in the folder (or in the list above, with
    the reason it does not)."""
    importers = {}
    for name, path in modules():
        for imported in imports_of(name, path):
            if imported != name:
                importers.setdefault(imported, set()).add(name)
    private = set()
    for name, _ in modules():
        folders = {_method_folder(m) for m in importers.get(name, ())}
        if name != "mim_jax" and _method_folder(name) is None and len(folders) == 1 and None not in folders:
            private.add(name)
    misplaced = sorted(f"{m} (only methods/{_method_folder(next(iter(importers[m])))}/ imports it)"
                       for m in private - set(SHARED_THOUGH_ONE_FOLDER_IMPORTS_THEM))
    assert not misplaced, "move into the method's folder: " + ", ".join(misplaced)
    stale = set(SHARED_THOUGH_ONE_FOLDER_IMPORTS_THEM) - private
    assert not stale, f"no longer imported by one method folder alone, drop from the list: {sorted(stale)}"


def test_no_import_cycle():
    """No two modules import each other, directly or through others (function-level imports
    included): layers allow imports within a layer, so this is checked on its own."""
    import graphlib
    graph = {name: {m for m in imports_of(name, path) if m != name and m != "mim_jax"} for name, path in modules()}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        raise AssertionError(f"import cycle: {' -> '.join(e.args[1])}") from None


def test_the_library_imports_no_config_file():
    """configs/*.py are recipes the entry points are given (--config=configs/mae.py); the library holds
    the defaults they build on (config_defaults) and needs none of them."""
    offenders = []
    for name, path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                imported = [node.module or ""] if not node.level else []
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                    "import_module", "__import__") and node.args:
                imported = [ast.unparse(node.args[0]).lstrip("f").strip("'\"")]
            else:
                continue
            offenders += [f"{name}:{node.lineno} {m}" for m in imported if m == "configs" or m.startswith("configs.")]
    assert not offenders, "\n".join(offenders)


def test_constructors_with_more_than_three_fields_are_called_by_keyword():
    offenders = []
    for path in sorted((ROOT / "mim_jax").rglob("*.py")) + sorted((ROOT / "configs").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                callee = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                if callee[:1].isupper() and len(node.args) > 3:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {callee}({len(node.args)} positional)")
    assert not offenders, "\n".join(offenders)


def test_every_module_imports_beside_every_other():
    """Entry points define their absl flags only when run as commands: two that both defined
    --config or --out at import time could not be imported by one program (or one test session)."""
    import subprocess
    import sys
    names = [name for name, _ in modules()]
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    out = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
