"""``key=value`` option lists (``--optimizer_args``, ``--lr_scheduler_args``, ``--network_args``).

Values are Python literals, as in musubi-tuner: ``betas=0.9,0.99`` is the tuple ``(0.9, 0.99)``,
``weight_decay=0.01`` a float, ``step_rules='1:10,0.1'`` a string. Where musubi-tuner breaks, this
parser does not:

* an item is split on its *first* ``=`` only, so ``expr=a=b`` gives ``{"expr": "a=b"}``;
* a bare word that is not a literal (``decay_type=cosine``, ``decay_type=1-sqrt``) stays a string,
  and ``true``/``false``/``none`` in any case are the booleans and None;
* an already-parsed mapping (a TOML table) passes through unchanged;
* a single string may hold several items separated by whitespace or newlines
  (``"weight_decay=0.01 betas=(0.9, 0.99)"``), as typed into a text box.
"""

from __future__ import annotations

import ast
import re
from typing import Any, Iterable, Mapping

from .errors import MusubiError

_WORD_LITERALS = {"true": True, "false": False, "none": None, "null": None}

# Characters that show the value was meant as a literal (a tuple, list, dict or quoted string), so
# a value containing them that fails to parse is a typo to report, not a bare word to keep.
_LITERAL_MARKERS = set("()[]{}'\"")

# Whitespace that is followed by the next ``key=``: the boundary between items in one string.
_ITEM_BOUNDARY = re.compile(r"\s+(?=[A-Za-z_][A-Za-z0-9_]*\s*=)")


def parse_key_value_args(items: Iterable[str] | Mapping[str, Any] | str | None, option_name: str) -> dict[str, Any]:
    """Turn ``key=value`` items into a dict; malformed items raise MusubiError naming the option."""
    if items is None:
        return {}
    if isinstance(items, Mapping):
        return _checked_mapping(items, option_name)
    if isinstance(items, str):
        items = [part for part in _ITEM_BOUNDARY.split(items.strip()) if part]
    parsed: dict[str, Any] = {}
    for item in items:
        if not isinstance(item, str):
            raise MusubiError(f"--{option_name}: expected 'key=value' text, got {item!r}")
        key, value = _split_item(item, option_name)
        if key in parsed:
            raise MusubiError(f"--{option_name}: '{key}' is given twice ({item!r}); keep one of them")
        parsed[key] = value
    return parsed


def format_key_value_args(values: Mapping[str, Any]) -> str:
    """``k=v,k=v``: the compact form musubi-tuner stores in metadata (``ss_optimizer``)."""
    return ",".join(f"{key}={value}" for key, value in values.items())


def _split_item(item: str, option_name: str) -> tuple[str, Any]:
    key, separator, text = item.partition("=")
    key = key.strip()
    if not separator:
        raise MusubiError(f"--{option_name}: {item!r} is not of the form key=value (e.g. weight_decay=0.01)")
    if not key.isidentifier():
        raise MusubiError(f"--{option_name}: {item!r} has no valid name before '=' (e.g. weight_decay=0.01)")
    text = text.strip()
    if not text:
        raise MusubiError(f"--{option_name}: {item!r} has no value after '='; write {key}='' for an empty string")
    return key, _parse_value(text, item, option_name)


def _parse_value(text: str, item: str, option_name: str) -> Any:
    if text.lower() in _WORD_LITERALS:
        return _WORD_LITERALS[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    if _LITERAL_MARKERS.intersection(text):
        raise MusubiError(
            f"--{option_name}: the value of {item!r} is not a valid Python literal; "
            "check brackets and quotes (e.g. betas=(0.9,0.99) or name='text')"
        )
    return text


def _checked_mapping(values: Mapping[Any, Any], option_name: str) -> dict[str, Any]:
    for key in values:
        if not isinstance(key, str) or not key.isidentifier():
            raise MusubiError(f"--{option_name}: {key!r} is not a valid argument name")
    return dict(values)
