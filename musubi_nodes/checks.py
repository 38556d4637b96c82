"""Input checks every node of the pack gets at registration, run before its ``execute``.

ComfyUI's range check lets NaN through (every comparison with NaN is false) and a JSON API client
can send NaN or ±Infinity for any FLOAT input, or a linked node can compute one. A non-finite
setting then reaches the model and comes back as an all-NaN result, or fails far from its cause.
So each node's FLOAT inputs, read from its own schema, are refused here when they are not finite,
in one place for the whole pack rather than node by node.
"""

from __future__ import annotations

import functools
import inspect
import math

from comfy_api.latest import io

from ..musubi.errors import MusubiError

_CHECKED = "_musubi_checks_finite_floats"  # on a class whose execute is wrapped
_UNCHECKED = "_musubi_unchecked_execute"  # on the wrapper: the execute it wraps


def float_inputs(node_class: type[io.ComfyNode]) -> tuple[str, list[str]]:
    """``(display name, ids of its FLOAT inputs)`` from the node's schema."""
    schema = node_class.define_schema()
    names = [item.id for item in schema.inputs or [] if isinstance(item, io.Float.Input)]
    return schema.display_name or schema.node_id, names


def non_finite_message(node: str, name: str, value: float) -> str:
    shown = "NaN" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return f"{node}: {name} is {shown}; give a finite number."


def check_finite_floats(node: str, names: list[str], inputs: dict) -> None:
    """Raise for the first FLOAT input that is NaN or ±inf (a list input is checked item by item)."""
    for name in names:
        value = inputs.get(name)
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, float) and not math.isfinite(item):
                raise MusubiError(non_finite_message(node, name, item))


def refuse_non_finite_floats(node_class: type[io.ComfyNode]) -> type[io.ComfyNode]:
    """Wrap the class's ``execute`` so its FLOAT inputs are checked first; the schema, node id and
    everything else stay as they are. ComfyUI passes inputs by name, so keyword inputs are checked.
    Wrapping twice is a no-op; a subclass of a wrapped node gets its own check (its own schema)."""
    if node_class.__dict__.get(_CHECKED, False):
        return node_class
    execute = node_class.execute.__func__
    execute = getattr(execute, _UNCHECKED, execute)  # an inherited, already wrapped execute: its original
    described: list[tuple[str, list[str]]] = []  # the schema is read once, on the first run

    def check(inputs: dict) -> None:
        if not described:
            described.append(float_inputs(node_class))
        node, names = described[0]
        check_finite_floats(node, names, inputs)

    if inspect.iscoroutinefunction(execute):
        @functools.wraps(execute)
        async def checked(cls, *args, **kwargs):
            check(kwargs)
            return await execute(cls, *args, **kwargs)
    else:
        @functools.wraps(execute)
        def checked(cls, *args, **kwargs):
            check(kwargs)
            return execute(cls, *args, **kwargs)

    setattr(checked, _UNCHECKED, execute)
    node_class.execute = classmethod(checked)
    setattr(node_class, _CHECKED, True)
    return node_class
