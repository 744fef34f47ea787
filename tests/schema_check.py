"""A small JSON-schema check for the tests (jsonschema is not a dependency): the keywords the
test schemas use — type, anyOf, properties, required, additionalProperties false, enum, items,
minItems / maxItems, minLength / maxLength, minimum / maximum."""

from __future__ import annotations

from typing import Any

TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list,), "string": (str,), "boolean": (bool,),
    "integer": (int,), "number": (int, float), "null": (type(None),),
}


def problems(value: Any, schema: dict[str, Any], where: str = "$") -> list[str]:
    """What in `value` breaks `schema` (empty: it matches)."""
    found: list[str] = []
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        ok = any(isinstance(value, TYPES[k]) and not (k in ("integer", "number") and isinstance(value, bool))
                 for k in kinds)
        if not ok:
            return [f"{where}: {value!r} is not of type {kind}"]
    if "anyOf" in schema and all(problems(value, sub, where) for sub in schema["anyOf"]):
        found.append(f"{where}: {value!r} matches none of anyOf")
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{where}: {value!r} not in {schema['enum']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                found.append(f"{where}: missing {name}")
        if schema.get("additionalProperties") is False:
            found += [f"{where}: extra {k}" for k in value if k not in props]
        for name, sub in props.items():
            if name in value:
                found += problems(value[name], sub, f"{where}.{name}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", 1 << 30):
            found.append(f"{where}: {len(value)} items")
        for i, item in enumerate(value):
            found += problems(item, schema.get("items", {}), f"{where}[{i}]")
    if isinstance(value, str) and not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", 1 << 30):
        found.append(f"{where}: length {len(value)}")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and not schema.get("minimum", float("-inf")) <= value <= schema.get("maximum", float("inf")):
        found.append(f"{where}: {value} out of range")
    return found
