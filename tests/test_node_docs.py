"""The node help pages: ``web/docs/<NodeId>.md``, which ComfyUI's node help panel shows.

The frontend fetches ``/extensions/<pack folder>/docs/<NodeId>/<locale>.md``, then
``/extensions/<pack folder>/docs/<NodeId>.md``; without a page the panel shows only the node's
one-line description. Each page must exist, belong to a node, carry the node's display name as its
title and name every input and output in its "Inputs" / "Outputs" section as a code span
(`` `name` ``), the way the node shows them.

Two sources of truth: the node classes read from the source (no ComfyUI needed: node ids and
display names), and the real server's ``/object_info`` (marker ``comfyui``: inputs and outputs as
ComfyUI sees them), which also serves one page over HTTP.
"""

from __future__ import annotations

import ast
import re
import urllib.request
from pathlib import Path

import pytest

from comfy_server import PACK_NAME

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS = REPO_ROOT / "web" / "docs"
NODES_PACKAGE = REPO_ROOT / "musubi_nodes"
PACK_PREFIX = "Musubi"
SECTIONS = ("Inputs", "Outputs", "Typical settings", "Pitfalls", "Example")


# --- the nodes, read from the source ------------------------------------------------------------

def _module_constants(tree: ast.Module) -> dict[str, str]:
    """Module-level ``NAME = "text"`` assignments."""
    constants = {}
    for statement in tree.body:
        if isinstance(statement, ast.Assign) and isinstance(statement.value, ast.Constant) \
                and isinstance(statement.value.value, str):
            for target in statement.targets:
                if isinstance(target, ast.Name):
                    constants[target.id] = statement.value.value
    return constants


def _schema_keywords(class_node: ast.ClassDef) -> dict[str, ast.expr]:
    """The keywords of the ``io.Schema(...)`` call that defines the node."""
    for call in ast.walk(class_node):
        if isinstance(call, ast.Call) and any(keyword.arg == "node_id" for keyword in call.keywords):
            return {keyword.arg: keyword.value for keyword in call.keywords if keyword.arg}
    return {}


def nodes_from_source() -> dict[str, dict]:
    """``{node id: {"display_name": text or None}}`` of every class in ``NODES``.

    A display name that is neither a string literal nor a module-level string constant is None
    (the server test checks it then).
    """
    init = ast.parse((NODES_PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    modules: dict[str, str] = {}
    listed: list[str] = []
    for statement in init.body:
        if isinstance(statement, ast.ImportFrom) and statement.level == 1 and statement.module:
            for alias in statement.names:
                modules[alias.asname or alias.name] = statement.module
        target = statement.target if isinstance(statement, ast.AnnAssign) else (
            statement.targets[0] if isinstance(statement, ast.Assign) and len(statement.targets) == 1 else None)
        if isinstance(target, ast.Name) and target.id == "NODES" and isinstance(statement.value, ast.List):
            listed = [element.id for element in statement.value.elts if isinstance(element, ast.Name)]
    assert listed, "musubi_nodes/__init__.py: no NODES list found"

    nodes: dict[str, dict] = {}
    for class_name in listed:
        module = modules.get(class_name)
        assert module, f"NODES lists {class_name}, which musubi_nodes/__init__.py does not import from a module of the package"
        path = NODES_PACKAGE / (module.replace(".", "/") + ".py")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        [class_node] = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == class_name]
        keywords = _schema_keywords(class_node)
        node_id = keywords.get("node_id")
        assert isinstance(node_id, ast.Constant), f"{class_name}: node_id is not a string literal"
        display = keywords.get("display_name")
        if isinstance(display, ast.Constant) and isinstance(display.value, str):
            display_name = display.value
        elif isinstance(display, ast.Name):
            display_name = _module_constants(tree).get(display.id)
        else:
            display_name = None
        nodes[node_id.value] = {"display_name": display_name}
    return nodes


# --- the checks, on any node table --------------------------------------------------------------

def documented_ids(docs: Path) -> set[str]:
    """Node ids the docs folder has pages for: ``<id>.md`` and locale folders ``<id>/<locale>.md``."""
    return {path.stem for path in docs.glob("*.md")} | {path.name for path in docs.iterdir() if path.is_dir()}


def page_of(docs: Path, node_id: str) -> Path:
    return docs / f"{node_id}.md"


def section(text: str, title: str) -> str | None:
    """The text under ``## <title>`` up to the next ``## `` heading (None when there is none)."""
    match = re.search(rf"^## {re.escape(title)}[ \t]*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    return match.group(1) if match else None


def without_code(text: str) -> str:
    """The text with fenced code blocks and inline code spans removed."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def input_names(info: dict) -> list[str]:
    inputs = info.get("input", {})
    return [name for group in ("required", "optional") for name in inputs.get(group, {})]


def page_problems(nodes: dict[str, dict], docs: Path) -> list[str]:
    """Every way the pages in ``docs`` disagree with ``nodes`` (node id -> its /object_info entry, or
    the part of it that is known: at least ``display_name``); an empty list when they agree."""
    problems = []
    if not docs.is_dir():
        return [f"{docs} does not exist"]
    ids = documented_ids(docs)
    problems += [f"{node_id}: no page {page_of(docs, node_id).relative_to(docs.parent)}" for node_id in sorted(set(nodes) - ids)]
    problems += [f"{name}: a page for no node of the pack" for name in sorted(ids - set(nodes))]
    for node_id, info in sorted(nodes.items()):
        path = page_of(docs, node_id)
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        first = next((line for line in text.splitlines() if line.strip()), "")
        display_name = info.get("display_name")
        if display_name is not None and first != f"# {display_name}":
            problems.append(f"{node_id}: the title is {first!r}, not '# {display_name}' (the display name)")
        for title in SECTIONS:
            if section(text, title) is None:
                problems.append(f"{node_id}: no '## {title}' section")
        inputs = section(text, "Inputs") or ""
        optional = set(info.get("input", {}).get("optional", {}))
        for name in input_names(info):
            if f"`{name}`" not in inputs:
                problems.append(f"{node_id}: input `{name}` is not named in its Inputs section")
                continue
            # "- `name` (optional) — what …"; one item may name several inputs: "- `width`, `height` — …"
            row = re.search(rf"^-\s*((?:`[^`\n]+`,\s*)*`{re.escape(name)}`(?:,\s*`[^`\n]+`)*)\s*(\(optional\))?\s*—",
                            inputs, re.M)
            if row is None:
                problems.append(f"{node_id}: input `{name}` has no list item '- `{name}` — …' in its Inputs section "
                                "(a list, not a table: the help panel is a narrow sidebar)")
            elif bool(row.group(2)) != (name in optional):
                state = "optional" if name in optional else "required"
                problems.append(f"{node_id}: input `{name}` is {state}, but its list item says otherwise "
                                "(mark optional inputs `name` (optional))")
        outputs, position = section(text, "Outputs") or "", 0
        for name in info.get("output_name", []):
            found = outputs.find(f"`{name}`", position)
            if found < 0:
                problems.append(f"{node_id}: output `{name}` is not named in its Outputs section (in the node's order)")
            else:
                position = found + len(name) + 2
        html = re.findall(r"<[A-Za-z/!][^>\n]*>?", without_code(text))
        if html:
            problems.append(f"{node_id}: HTML or a bare <placeholder> outside code spans (the help panel drops it): {html[:3]}")
        for workflow in re.findall(r"workflows/([\w.-]+\.json)", text):
            if not (REPO_ROOT / "workflows" / workflow).is_file():
                problems.append(f"{node_id}: names workflows/{workflow}, which does not exist")
    return problems


# --- without ComfyUI ----------------------------------------------------------------------------

def test_every_node_has_a_page_titled_with_its_display_name():
    nodes = nodes_from_source()
    assert all(node_id.startswith(PACK_PREFIX) for node_id in nodes), sorted(nodes)
    problems = page_problems(nodes, DOCS)
    assert not problems, "\n".join(problems)


def test_the_checks_catch_each_kind_of_mistake(tmp_path):
    info = {
        "MusubiGood": {"display_name": "Good", "input": {"required": {"a": []}, "optional": {"b": []}},
                       "output_name": ["MODEL", "STRING"]},
        "MusubiMissing": {"display_name": "Missing"},
    }
    docs = tmp_path / "docs"
    docs.mkdir()
    sections = "".join(f"## {title}\n\ntext\n\n" for title in SECTIONS[2:])
    good = "# Good\n\n## Inputs\n\n- `a` — x\n- `b` (optional) — y\n\n## Outputs\n\n`MODEL`, `STRING`\n\n" + sections
    (docs / "MusubiGood.md").write_text(good, encoding="utf-8")
    assert page_problems(info, docs) == ["MusubiMissing: no page docs/MusubiMissing.md"]

    del info["MusubiMissing"]
    assert page_problems(info, docs) == []
    (docs / "MusubiOrphan.md").write_text("# Orphan\n", encoding="utf-8")
    assert page_problems(info, docs) == ["MusubiOrphan: a page for no node of the pack"]
    (docs / "MusubiOrphan.md").unlink()
    (docs / "MusubiOrphan").mkdir()  # a locale folder (<id>/<locale>.md) of no node
    assert page_problems(info, docs) == ["MusubiOrphan: a page for no node of the pack"]
    (docs / "MusubiOrphan").rmdir()

    cases = {
        "a title that is not the display name": (good.replace("# Good", "# Better"), "the title is '# Better'"),
        "a missing input": (good.replace("`b` (optional)", "b (optional)"), "input `b` is not named"),
        "an optional input not marked": (good.replace("`b` (optional)", "`b`"), "input `b` is optional"),
        "a required input marked optional": (good.replace("- `a` —", "- `a` (optional) —"), "input `a` is required"),
        "an input in a table": (good.replace("- `a` — x", "| `a` | x |"), "input `a` has no list item"),
        "a missing output": (good.replace("`MODEL`, ", ""), "output `MODEL` is not named"),
        "outputs out of order": (good.replace("`MODEL`, `STRING`", "`STRING`, `MODEL`"), "output `STRING` is not named"),
        "a missing section": (good.replace("## Pitfalls", "## Problems"), "no '## Pitfalls' section"),
        "an input named only outside its section": (good.replace("- `a` — x", "- a — x") + "`a`\n", "input `a` is not named"),
        "a bare placeholder": (good + "\nFiles go to models/loras/<output_name>/.\n", "HTML or a bare <placeholder>"),
        "a missing workflow": (good + "\n`workflows/no_such_workflow.json`\n", "names workflows/no_such_workflow.json"),
    }
    for what, (text, expected) in cases.items():
        (docs / "MusubiGood.md").write_text(text, encoding="utf-8")
        problems = page_problems(info, docs)
        assert len(problems) == 1 and expected in problems[0], f"{what}: {problems}"

    (docs / "MusubiGood.md").write_text(good + "\n`models/loras/<output_name>/`\n", encoding="utf-8")
    assert page_problems(info, docs) == [], "a placeholder inside a code span is fine"


# --- against the real server -------------------------------------------------------------------

@pytest.fixture(scope="module")
def object_info(comfy) -> dict:
    return comfy.object_info()


@pytest.mark.comfyui
def test_pages_match_the_nodes_as_comfyui_lists_them(object_info):
    ours = {node_id: info for node_id, info in object_info.items() if node_id.startswith(PACK_PREFIX)}
    assert set(ours) == set(nodes_from_source()), "the server lists other nodes than musubi_nodes.NODES"
    problems = page_problems(ours, DOCS)
    assert not problems, "\n".join(problems)


@pytest.mark.comfyui
def test_no_pack_node_shares_its_display_name_with_another_node(object_info):
    """The node search shows display names only: two nodes called alike cannot be told apart
    (core's TrainLoraNode is "Train LoRA", hence "Train LoRA (musubi)")."""
    clashes = []
    for node_id, info in sorted(object_info.items()):
        name = info.get("display_name") or node_id
        if node_id.startswith(PACK_PREFIX):
            same = [other for other, spec in object_info.items()
                    if other != node_id and (spec.get("display_name") or other) == name]
            clashes += [f"{node_id} and {other} are both shown as {name!r}" for other in same]
    assert not clashes, "\n".join(clashes)


@pytest.mark.comfyui
def test_a_page_is_served_where_the_help_panel_looks(comfy):
    node_id = "MusubiTrainLoRA"
    url = f"{comfy.url}/extensions/{PACK_NAME}/docs/{node_id}.md"
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200, url
        body = response.read()
    assert body == page_of(DOCS, node_id).read_bytes(), f"{url} does not serve web/docs/{node_id}.md"
