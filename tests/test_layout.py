"""The project's shape: one concept per folder, no import circles, one table of model families.

These read the source (``ast``), so they hold for code paths no other test runs.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from musubi import architectures
from musubi.architectures import FAMILY_NAMES, WITH_GENERIC

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("musubi", "musubi_nodes")
LIBRARY_TOP_LEVEL_LIMIT = 9  # modules directly in musubi/, __init__ and __main__ included


def project_modules() -> dict[str, Path]:
    """Dotted name (relative to the repository root) -> file, for every module of the project."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def resolve(importer: str, is_package: bool, node: ast.ImportFrom | ast.Import, known: set[str]) -> list[str]:
    """The project modules an import statement loads (a package's ``__init__`` counts as a module)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = importer.split(".")
            base = base if is_package else base[:-1]
            base = base[: len(base) - (node.level - 1)]
            # The pack imports the library as its sibling (``..musubi``): drop that step out of the pack.
            if len(base) == 0:
                base = []
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]
    found = []
    for name in names:
        name = name.strip(".")
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != importer:
            found.append(name)
    return sorted(set(found))


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """Module -> project modules it imports at module level; and every function-level project import."""
    modules = project_modules()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    inner: list[str] = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        is_package = path.name == "__init__.py"
        graph[name] = set()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = resolve(name, is_package, node, known)
            if node.col_offset == 0:
                graph[name].update(targets)
            elif targets:
                inner.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} imports {', '.join(targets)}")
        # A package imports its own __init__ when any of its modules is imported; that is no circle.
    return graph, inner


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def test_the_import_graph_has_no_circle():
    graph, _ = import_graph()
    # The pack's relative imports of ``..musubi`` resolve into the library: both are in the graph.
    assert any(target.startswith("musubi.") for target in graph["musubi_nodes.train_lora"]), "the resolver missed ..musubi"
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_circle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_project_module_is_imported_inside_a_function():
    """Imports inside functions are how circles hide; heavy third-party ones (diffusers, comfy) are fine."""
    _, inner = import_graph()
    assert inner == [], "imports of project modules inside functions:\n" + "\n".join(inner)


def test_the_library_never_imports_comfyui():
    for path in (REPO_ROOT / "musubi").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots = [node.module.split(".")[0]]
            else:
                continue
            assert not set(roots) & {"comfy", "comfy_api", "comfy_extras", "folder_paths", "server", "nodes"}, (
                f"{path.relative_to(REPO_ROOT)}:{node.lineno} imports ComfyUI"
            )


def test_the_library_top_level_holds_only_shared_modules():
    top = sorted(path.name for path in (REPO_ROOT / "musubi").glob("*.py"))
    assert len(top) <= LIBRARY_TOP_LEVEL_LIMIT, f"musubi/ has {len(top)} modules at its top level: {top}"
    for concept in ("lora", "training", "data", "magcache", "framepack"):
        assert (REPO_ROOT / "musubi" / concept / "__init__.py").is_file(), concept


def test_import_nodes_cannot_resolve_to_the_pack():
    """ComfyUI's own ``nodes`` module must win wherever the repository root is on sys.path."""
    assert not (REPO_ROOT / "nodes").exists() and not (REPO_ROOT / "nodes.py").exists()


def test_one_atomic_writer():
    """Files are replaced in exactly one place (musubi/files.py), which flushes file and folder."""
    offenders = []
    for package in PACKAGES:
        for path in (REPO_ROOT / package).rglob("*.py"):
            if path == REPO_ROOT / "musubi" / "files.py":
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if re.search(r"\bos\.(replace|rename)\(|tempfile\.mkstemp\(", line):
                    offenders.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_every_family_table_covers_every_family():
    from musubi.data.plan import ARCHITECTURE_CODES
    from musubi.data.text_embeddings import ARCHITECTURES as TEXT_ARCHITECTURES
    from musubi.fp8 import RULES
    from musubi.lora.presets import PRESETS
    from musubi.training.adapter import ARCHITECTURES as ADAPTER_ARCHITECTURES

    assert set(RULES) == set(WITH_GENERIC)
    assert set(PRESETS) == set(WITH_GENERIC)
    assert set(ARCHITECTURE_CODES) == set(FAMILY_NAMES)
    assert set(TEXT_ARCHITECTURES) == set(FAMILY_NAMES)
    assert set(ADAPTER_ARCHITECTURES) == set(WITH_GENERIC)
    codes = [family.cache_code for family in architectures.FAMILIES]
    assert len(set(codes)) == len(codes), "cache codes must tell the families apart"
    assert set(architectures.COMFYUI_CLASSES.values()) == set(architectures.COMFYUI_NATIVE)


@pytest.mark.parametrize("name", ["wan", "hunyuan_video", "framepack", "flux", "qwen_image"])
def test_family_lookup(name):
    assert architectures.family(name).name == name


def test_unknown_family_is_refused_with_the_choices():
    with pytest.raises(Exception, match="choose one of wan, hunyuan_video"):
        architectures.family("sd15")
