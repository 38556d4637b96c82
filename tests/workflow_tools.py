"""Check UI-format workflows against a live /object_info and turn them into API format.

The conversion follows the frontend's rules: widget values are listed in the order of the
node's widget inputs (required, then optional), a widget with ``control_after_generate``
carries one extra value — so does an INT input named ``seed`` or ``noise_seed`` that does not
say (the frontend adds the control widget to those by legacy convention) — and linked inputs
come from the ``links`` table.
"""

from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
DOCUMENTATION_NODES = {"Note", "MarkdownNote"}
MUTED_MODES = {2, 4}  # muted, bypassed


def _ordered_inputs(spec: dict) -> list[tuple[str, str, dict]]:
    """(name, type, options) of a node's inputs in the order the frontend shows them."""
    result = []
    for section in ("required", "optional"):
        entries = spec["input"].get(section, {})
        order = spec.get("input_order", {}).get(section, list(entries))
        for name in order:
            type_, *rest = entries[name]
            options = rest[0] if rest else {}
            result.append((name, "COMBO" if isinstance(type_, list) else type_, options))
    return result


def _is_widget(type_: str, options: dict) -> bool:
    return type_ in WIDGET_TYPES and not options.get("forceInput")


def has_control_widget(name: str, type_: str, options: dict) -> bool:
    """Whether the frontend adds a "control after generate" widget (one more value) after this one."""
    return bool(options.get("control_after_generate", type_ == "INT" and name in ("seed", "noise_seed")))


def _combo_options(type_entry, options: dict) -> list:
    return type_entry if isinstance(type_entry, list) else options.get("options", [])


def widget_values_by_name(node: dict, spec: dict) -> dict:
    values = list(node.get("widgets_values") or [])
    named = {}
    for name, type_, options in _ordered_inputs(spec):
        if not _is_widget(type_, options):
            continue
        if not values:
            break
        named[name] = values.pop(0)
        if has_control_widget(name, type_, options) and values:
            values.pop(0)
    return named


def check_ui_workflow(workflow: dict, object_info: dict) -> list[str]:
    """Problems that would show as missing nodes, broken links or invalid widgets in the UI."""
    problems = []
    nodes = {node["id"]: node for node in workflow["nodes"]}
    for node in workflow["nodes"]:
        if node["type"] in DOCUMENTATION_NODES:
            continue
        spec = object_info.get(node["type"])
        if spec is None:
            problems.append(f"node {node['id']}: unknown node type {node['type']}")
            continue
        inputs = {name: (type_, options) for name, type_, options in _ordered_inputs(spec)}
        widget_count = sum(_is_widget(t, o) for t, o in inputs.values())
        extra = sum(1 for n, (t, o) in inputs.items() if _is_widget(t, o) and has_control_widget(n, t, o))
        given = len(node.get("widgets_values") or [])
        if given not in (widget_count, widget_count + extra):
            problems.append(f"node {node['id']} ({node['type']}): {given} widget values for {widget_count} widgets")
        for name, value in widget_values_by_name(node, spec).items():
            type_, options = inputs[name]
            entry = spec["input"].get("required", {}).get(name) or spec["input"]["optional"][name]
            if type_ == "COMBO":
                choices = _combo_options(entry[0], options)
                if choices and value not in choices:
                    problems.append(f"node {node['id']} ({node['type']}).{name}: {value!r} is not one of its options")
            elif type_ in ("INT", "FLOAT"):
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    problems.append(f"node {node['id']}.{name}: {value!r} is not a number")
                elif ("min" in options and value < options["min"]) or ("max" in options and value > options["max"]):
                    problems.append(f"node {node['id']}.{name}: {value} is outside [{options.get('min')}, {options.get('max')}]")
            elif type_ == "BOOLEAN" and not isinstance(value, bool):
                problems.append(f"node {node['id']}.{name}: {value!r} is not a boolean")
        for slot in node.get("inputs", []):
            if slot.get("link") is not None and slot["name"] not in inputs:
                problems.append(f"node {node['id']} ({node['type']}): no input named {slot['name']}")
    for link_id, source, source_slot, target, target_slot, type_ in workflow.get("links", []):
        if source not in nodes or target not in nodes:
            problems.append(f"link {link_id}: joins missing nodes {source} → {target}")
            continue
        source_spec = object_info.get(nodes[source]["type"])
        if source_spec and source_slot >= len(source_spec["output"]):
            problems.append(f"link {link_id}: node {source} has no output {source_slot}")
        elif source_spec and source_spec["output"][source_slot] != type_ and type_ != "*":
            problems.append(f"link {link_id}: carries {type_} but output {source_slot} of node {source} is {source_spec['output'][source_slot]}")
        target_inputs = [slot for slot in nodes[target].get("inputs", []) if slot.get("link") == link_id]
        if not target_inputs:
            problems.append(f"link {link_id}: node {target} has no input using it")
    return problems


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API-format prompt that queuing this UI workflow would send."""
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in DOCUMENTATION_NODES or node.get("mode", 0) in MUTED_MODES:
            continue
        spec = object_info[node["type"]]
        inputs = dict(widget_values_by_name(node, spec))
        for slot in node.get("inputs", []):
            link = links.get(slot.get("link"))
            if link is not None:
                inputs[slot["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
