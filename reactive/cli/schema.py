"""Check a JSON value against the JSON Schema an engine announced (what msgspec writes).

The subset msgspec emits for the types it decodes: ``$ref`` into ``$defs``, ``anyOf`` /
``oneOf`` / ``allOf``, ``type``, ``enum``, ``const``, ``properties`` with ``required`` and
``additionalProperties``, ``items`` / ``prefixItems``, and the numeric, length and pattern
constraints of ``msgspec.Meta``. Anything else is not checked (``format`` for one): the check
never refuses what msgspec would decode, and the engine still decodes what it receives.

Every problem is reported at once, each at its path (``$.field``, ``$.items[0]``).
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Callable
from typing import Any

__all__ = ["problems"]

_MAX_PROBLEMS = 20


def problems(schema: dict[str, Any], value: Any) -> list[str]:
    """What is wrong with ``value`` for ``schema``: one line per problem, empty if it fits."""
    found: list[str] = []
    _Checker(schema.get("$defs") or {}, found).check(schema, value, "$")
    return found[:_MAX_PROBLEMS]


def json_type(value: Any) -> str:
    """The JSON type name of a decoded JSON value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _is(value: Any, name: str) -> bool:
    actual = json_type(value)
    return actual == name or (name == "number" and actual == "integer")


def _same(a: Any, b: Any) -> bool:
    """JSON equality: 1 is not true, 1 is 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return bool(a == b)


class _Checker:
    def __init__(self, defs: dict[str, Any], found: list[str]) -> None:
        self.defs = defs
        self.found = found

    def check(self, schema: Any, value: Any, path: str) -> None:
        if not isinstance(schema, dict) or len(self.found) >= _MAX_PROBLEMS:
            return
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            self.check(self.defs.get(ref[len("#/$defs/") :]), value, path)
        for key in ("anyOf", "oneOf"):
            options = schema.get(key)
            if isinstance(options, list) and options:
                if not any(self._fits(option, value) for option in options):
                    wanted = " or ".join(dict.fromkeys(self._describe(o) for o in options))
                    self.found.append(f"{path}: expected {wanted}, got {_shown(value)}")
                    return
        for part in schema.get("allOf") or []:
            self.check(part, value, path)
        if "enum" in schema and not any(_same(value, e) for e in schema["enum"]):
            choices = ", ".join(_literal(e) for e in schema["enum"])
            self.found.append(f"{path}: expected one of {choices}, got {_shown(value)}")
            return
        if "const" in schema and not _same(value, schema["const"]):
            wanted_value = _literal(schema["const"])
            self.found.append(f"{path}: expected {wanted_value}, got {_shown(value)}")
            return
        types = schema.get("type")
        if types is not None:
            names = [types] if isinstance(types, str) else list(types)
            if not any(_is(value, n) for n in names):
                self.found.append(f"{path}: expected {' or '.join(names)}, got {_shown(value)}")
                return
        if isinstance(value, dict):
            self._object(schema, value, path)
        elif isinstance(value, list):
            self._array(schema, value, path)
        elif isinstance(value, str):
            self._string(schema, value, path)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            self._number(schema, value, path)

    def _fits(self, schema: Any, value: Any) -> bool:
        inner: list[str] = []
        _Checker(self.defs, inner).check(schema, value, "$")
        return not inner

    def _describe(self, schema: Any) -> str:
        if not isinstance(schema, dict):
            return "anything"
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            target = self.defs.get(ref[len("#/$defs/") :]) or {}
            return str(target.get("title") or "object")
        if "type" in schema:
            t = schema["type"]
            return t if isinstance(t, str) else " or ".join(t)
        if "enum" in schema:
            return "one of " + ", ".join(_literal(e) for e in schema["enum"])
        if "const" in schema:
            return _literal(schema["const"])
        return "anything"

    def _object(self, schema: dict[str, Any], value: dict[str, Any], path: str) -> None:
        properties = schema.get("properties") or {}
        for name in schema.get("required") or []:
            if name not in value:
                self.found.append(f"{path}: missing required field {name!r}")
        extra = schema.get("additionalProperties")
        for name, item in value.items():
            where = f"{path}.{name}" if _PLAIN.match(name) else f"{path}[{name!r}]"
            if name in properties:
                self.check(properties[name], item, where)
            elif extra is False:
                self.found.append(f"{path}: unknown field {name!r}")
            elif isinstance(extra, dict):
                self.check(extra, item, where)
        self._bounds(len(value), schema, "minProperties", "maxProperties", path, "fields")

    def _array(self, schema: dict[str, Any], value: list[Any], path: str) -> None:
        prefix = schema.get("prefixItems") or []
        for i, item in enumerate(value):
            if i < len(prefix):
                self.check(prefix[i], item, f"{path}[{i}]")
            elif schema.get("items") is False and prefix:
                self.found.append(f"{path}: expected at most {len(prefix)} items")
                break
            elif isinstance(schema.get("items"), dict):
                self.check(schema["items"], item, f"{path}[{i}]")
        self._bounds(len(value), schema, "minItems", "maxItems", path, "items")

    def _string(self, schema: dict[str, Any], value: str, path: str) -> None:
        self._bounds(len(value), schema, "minLength", "maxLength", path, "characters")
        pattern = schema.get("pattern")
        if isinstance(pattern, str):
            try:
                matched = re.search(pattern, value) is not None
            except re.error:
                matched = True  # a pattern Python cannot read: not checked here
            if not matched:
                self.found.append(f"{path}: expected a string matching {pattern!r}")

    def _number(self, schema: dict[str, Any], value: float, path: str) -> None:
        for key, sign in _BOUNDS:
            bound = schema.get(key)
            if isinstance(bound, int | float) and not _OK[sign](value, bound):
                self.found.append(f"{path}: expected a number {sign} {bound}, got {value!r}")
        step = schema.get("multipleOf")
        # Integers only: a float remainder is rounding noise, and msgspec has the last word.
        if isinstance(step, int) and isinstance(value, int) and step > 0 and value % step:
            self.found.append(f"{path}: expected a multiple of {step}, got {value!r}")

    def _bounds(
        self, n: int, schema: dict[str, Any], low: str, high: str, path: str, what: str
    ) -> None:
        least, most = schema.get(low), schema.get(high)
        if isinstance(least, int) and n < least:
            self.found.append(f"{path}: expected at least {least} {what}, got {n}")
        if isinstance(most, int) and n > most:
            self.found.append(f"{path}: expected at most {most} {what}, got {n}")


_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_BOUNDS = (
    ("minimum", ">="),
    ("maximum", "<="),
    ("exclusiveMinimum", ">"),
    ("exclusiveMaximum", "<"),
)
_OK: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
}


def _literal(value: Any) -> str:
    return json.dumps(value)


def _shown(value: Any) -> str:
    kind = json_type(value)
    if kind in ("string", "integer", "number", "boolean", "null"):
        text = _literal(value)
        return f"{kind} {text}" if len(text) <= 40 else kind
    return kind
