"""JSON schemas to GBNF grammars, for constrained decoding (structured output, tool calls).

The conversion is llama-cpp-python's (`llama_grammar.json_schema_to_gbnf`, the port of
llama.cpp's `json_schema_to_grammar`); what is ours is the gate in front of it. A schema
is checked for size, depth and `$ref` loops before the converter sees it, because the
converter recurses without bound and a recursive schema gives a grammar whose output need
never end; a schema the converter then refuses is reported with the part it named. Every
refusal is a `SchemaError` carrying the request field (`param`) the HTTP layer puts in its
400.

The grammar itself is compiled by llama.cpp on the model thread
(`llama_sampler_init_grammar`, runtime/gguf/gguf_batch.py), where the vocabulary is.
"""

from __future__ import annotations

import json
from typing import Any

#: A schema's size as compact JSON, in bytes (OpenAI's own limit for strict schemas is
#: 15,000 characters of property names and enum values; this bounds the whole document).
MAX_SCHEMA_BYTES = 65_536
#: Nesting of objects and arrays within a schema (OpenAI allows 5 levels of objects; the
#: JSON nesting of a schema is about twice its object levels).
MAX_SCHEMA_DEPTH = 32
#: Properties over all objects of one schema (OpenAI allows 5,000 in strict mode).
MAX_SCHEMA_PROPERTIES = 1000


class SchemaError(ValueError):
    """A schema we will not turn into a grammar; `param` names the request field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _depth(node: Any, limit: int, param: str, level: int = 0) -> int:
    """Counts properties while checking nesting depth (iterative enough for the limit)."""
    if level > limit:
        raise SchemaError(f"the schema is nested more than {limit} levels deep", param)
    count = 0
    if isinstance(node, dict):
        props = node.get("properties")
        if isinstance(props, dict):
            count += len(props)
        for value in node.values():
            count += _depth(value, limit, param, level + 1)
    elif isinstance(node, list):
        for value in node:
            count += _depth(value, limit, param, level + 1)
    return count


def _refs(node: Any) -> list[str]:
    """Every `$ref` string within `node`."""
    found: list[str] = []
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            ref = item.get("$ref")
            if isinstance(ref, str):
                found.append(ref)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def _resolve(root: dict[str, Any], ref: str, param: str) -> Any:
    if not ref.startswith("#"):
        raise SchemaError(f"$ref {ref!r} points outside the schema; only local refs (#/...) are "
                          "supported", param)
    node: Any = root
    for raw in ref[1:].split("/")[1:] if ref != "#" else []:
        part = raw.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            raise SchemaError(f"$ref {ref!r} does not resolve within the schema", param)
        node = node[part]
    return node


def _check_refs(schema: dict[str, Any], param: str) -> None:
    """Refuse a `$ref` that leaves the schema, does not resolve, or leads back to itself
    (a recursive schema: its grammar has outputs of any depth, which max_tokens would cut)."""
    targets: dict[str, Any] = {}
    pending = list(dict.fromkeys(_refs(schema)))
    while pending:
        ref = pending.pop()
        if ref in targets:
            continue
        targets[ref] = _resolve(schema, ref, param)
        pending.extend(r for r in _refs(targets[ref]) if r not in targets)
    edges = {ref: set(_refs(target)) for ref, target in targets.items()}
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(ref: str, path: list[str]) -> None:
        state[ref] = 1
        for nxt in sorted(edges[ref]):
            if state.get(nxt) == 1:
                loop = " -> ".join([*path[path.index(nxt):], nxt]) if nxt in path else f"{ref} -> {nxt}"
                raise SchemaError(f"the schema is recursive ($ref loop {loop}); recursive schemas "
                                  "are not supported", param)
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[ref] = 2

    for ref in sorted(edges):
        if ref not in state:
            visit(ref, [ref])
    if "#" in targets:
        raise SchemaError("the schema refers to itself ($ref \"#\"); recursive schemas are not "
                          "supported", param)


def check_schema(schema: Any, param: str) -> None:
    """Size, depth, property count and `$ref` checks, before any conversion."""
    if not isinstance(schema, dict):
        raise SchemaError("the schema must be a JSON object", param)
    size = len(json.dumps(schema, separators=(",", ":")))
    if size > MAX_SCHEMA_BYTES:
        raise SchemaError(f"the schema is {size} bytes; at most {MAX_SCHEMA_BYTES} are accepted", param)
    if _depth(schema, MAX_SCHEMA_DEPTH, param) > MAX_SCHEMA_PROPERTIES:
        raise SchemaError(f"the schema has more than {MAX_SCHEMA_PROPERTIES} properties", param)
    _check_refs(schema, param)


def schema_rules(schema: dict[str, Any], param: str, name: str = "root") -> str:
    """GBNF for `schema` whose start rule is `name` (checked first; converter refusals become
    SchemaError naming what it could not handle)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    check_schema(schema, param)
    try:
        grammar = json_schema_to_gbnf(json.dumps(schema))
    except RecursionError:
        raise SchemaError("the schema is too deeply nested to convert", param) from None
    except (AssertionError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        # the converter's refusals: assertions and ValueErrors naming the part
        raise SchemaError(f"the schema cannot be turned into a grammar: {exc}", param) from None
    # JSON strings hold no raw control characters; the converter's `char` allows them
    # (llama.cpp's own converter excludes them since), and small models do write newlines.
    grammar = grammar.replace('char ::= [^"\\\\]', 'char ::= [^"\\\\\\x7F\\x00-\\x1F]')
    if name == "root":
        return grammar
    return rename_root(grammar, name)


def rename_root(grammar: str, name: str) -> str:
    """`grammar` with every rule prefixed by `name-` and its root called `name`, so several
    converted schemas can live in one grammar."""
    import re

    rules = re.findall(r"^([a-zA-Z0-9-]+) ::=", grammar, flags=re.M)
    mapping = {rule: (name if rule == "root" else f"{name}-{rule}") for rule in rules}
    pattern = re.compile(r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]|[a-zA-Z0-9-]+')

    def sub(match: re.Match[str]) -> str:
        text = match.group(0)
        return mapping.get(text, text)

    return "\n".join(pattern.sub(sub, line) for line in grammar.splitlines())


#: Bounds of `json_object` output: a small model otherwise loops inside a string or keeps
#: adding members until max_tokens cuts the object (seen with the 135M demo model); these
#: bounds let every object close within a few hundred tokens.
JSON_OBJECT_MAX_MEMBERS = 16
JSON_OBJECT_MAX_STRING = 128
JSON_OBJECT_MAX_DEPTH = 4


def json_object_grammar() -> str:
    """Any JSON object (response_format json_object), as llama.cpp's json.gbnf writes it
    (no raw control characters in strings, bounded whitespace), within the bounds above:
    members per object and items per array, characters per string, nesting levels."""
    n, chars = JSON_OBJECT_MAX_MEMBERS - 1, JSON_OBJECT_MAX_STRING
    lines = [
        "root ::= object1",
        'string ::= "\\"" char{0,' + str(chars) + '} "\\"" ws',
        'char ::= [^"\\\\\\x7F\\x00-\\x1F] | "\\\\" (["\\\\/bfnrt] | "u" [0-9a-fA-F]{4})',
        'number ::= "-"? ([0-9] | [1-9] [0-9]{1,15}) ("." [0-9]{1,15})? ([eE] [-+]? [0-9]{1,3})? ws',
        'scalar ::= string | number | ("true" | "false" | "null") ws',
        'ws ::= | " " | "\\n" [ \\t]{0,20}',
    ]
    for depth in range(1, JSON_OBJECT_MAX_DEPTH + 1):
        value = "scalar" if depth == JSON_OBJECT_MAX_DEPTH else f"value{depth + 1}"
        if depth < JSON_OBJECT_MAX_DEPTH:
            lines.append(f"value{depth + 1} ::= object{depth + 1} | array{depth + 1} | scalar")
        member = f'string ":" ws {value}'
        lines.append(f'object{depth} ::= "{{" ws ({member} ("," ws {member}){{0,{n}}})? "}}" ws')
        lines.append(f'array{depth} ::= "[" ws ({value} ("," ws {value}){{0,{n}}})? "]" ws')
    return "\n".join(lines)
