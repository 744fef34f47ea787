"""Tool calls in a model's own format, for chat templates that know tools.

A GGUF's ``tokenizer.chat_template`` (or a bundle's ``chat_template`` override) that takes
a ``tools`` variable was trained with a call format of its own. As llama-server does
(common/chat.cpp, ``common_chat_templates_apply_jinja``), the format is told from the
template's source, and such a model then sees its tools, its earlier calls and the tool
results through its own template, and writes its calls the way it was trained to:

- ``hermes`` (Hermes 2 Pro, Qwen 2.5; the source has ``<tool_call>``): each call is
  ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, several in a row when
  parallel calls are on.
- ``llama3`` (Llama 3.1 / 3.2 / 3.3; the source has an ``ipython`` header): one call, the
  JSON ``{"name": ..., "parameters": {...}}`` right after the assistant header (Llama 3.1
  may put ``<|python_tag|>`` first; it is a control token, so it does not show in the text).
- ``generic``: every other template, also one that takes ``tools`` in a format we do not
  know: runtime/gguf/tool_calls.py's format, in a system message the HTTP layer adds.

Decoding is constrained by a grammar of the format, built from the tools' parameter
schemas (runtime/gguf/grammar.py), so that ``required`` and a named function always give a call
whose arguments parse and match their schema. For ``auto`` the grammar offers either the
calls or text that does not start the way a call does; llama-server makes that grammar
lazy instead (it starts at a trigger word anywhere in the text), which needs the lazy
grammar sampler in the decode loop: here a call is constrained only at the start of an
answer. The answer is read back as llama.cpp reads it (``common_chat_parse_hermes_2_pro``,
``common_chat_parse_llama_3_1``): calls wherever they parse, the text before them as content.

This module only knows formats: the template is rendered by runtime/gguf/gguf_backend.py.
"""

from __future__ import annotations

import json
import re
from typing import Any

from runtime.gguf.tool_calls import MAX_PARALLEL_CALLS, Tool, call_rule, new_call_id

GENERIC = "generic"
HERMES = "hermes"
LLAMA3 = "llama3"

#: What each format's call looks like at the start of the answer (for `auto`'s text branch).
_CALL_START = {HERMES: "<", LLAMA3: "{"}
_LLAMA3_CALL = re.compile(r'\{\s*(?:"type"\s*:\s*"function"\s*,\s*)?"name"\s*:\s*"([^"]+)"\s*,\s*"parameters"\s*:\s*')
_HERMES_OPEN = re.compile(r"\s*<tool_call>\s*")
_HERMES_NEXT = re.compile(r"\s*</tool_call>\s*<tool_call>\s*")
_HERMES_END = re.compile(r"\s*</tool_call>\s*$")


def knows_tools(template: str) -> bool:
    """Whether the Jinja template reads a `tools` variable (a template error: False; the
    formatter reports it)."""
    import jinja2
    import jinja2.ext
    from jinja2 import meta
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    env = jinja2.Environment(extensions=[Jinja2ChatFormatter.IgnoreGenerationTags, jinja2.ext.loopcontrols])
    try:
        return "tools" in meta.find_undeclared_variables(env.parse(template))
    except jinja2.TemplateError:
        return False


def detect(template: str | None) -> str:
    """The tool-call format of a chat template: hermes, llama3 or generic (llama.cpp's tests
    on the source, for templates that take `tools`)."""
    if not template or not knows_tools(template):
        return GENERIC
    if "<tool_call>" in template:
        return HERMES
    if "<|start_header_id|>ipython<|end_header_id|>" in template:
        return LLAMA3
    return GENERIC


def grammar(fmt: str, tools: list[Tool], choice: str, named: str | None, parallel: bool,
            param: str = "tools") -> str:
    """GBNF for the calls of `fmt` under tool_choice `choice` ("auto", "required" or
    "function" with `named`)."""
    key = "arguments" if fmt == HERMES else "parameters"
    names, rules = [], []
    for i, tool in enumerate(tools):
        if named is None or tool.name == named:
            name, text = call_rule(i, tool, param, key)
            names.append(name)
            rules.append(text)
    top = [f'call ::= {" | ".join(names)}', 'space ::= " "?']
    if fmt == HERMES:
        top.append('block ::= "<tool_call>\\n" call "\\n</tool_call>"')
        more = f' ("\\n" block){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else ""
        top.append(f"calls ::= block{more}")
    else:  # llama3: one call (its template takes one call per assistant message)
        top.append("calls ::= call")
    if choice == "auto":
        start = _CALL_START[fmt]
        top += ["root ::= calls | text", f'text ::= [^{start}\\x00] [^\\x00]*']
    else:
        top.append("root ::= calls")
    return "\n".join(top + rules)


def _hermes(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    opened = _HERMES_OPEN.search(text)
    if opened is None:
        return text, []
    decoder = json.JSONDecoder()
    calls = []
    at = opened.end()
    try:
        while True:
            call, at = decoder.raw_decode(text, at)
            calls.append(_call(call["name"], call["arguments"]))
            following = _HERMES_NEXT.match(text, at)
            if following is None:
                break
            at = following.end()
        if _HERMES_END.match(text, at) is None:
            raise ValueError("missing </tool_call>")
    except (ValueError, KeyError, TypeError):
        return text, []  # as llama.cpp: an answer whose calls do not parse is text
    return text[:opened.start()] or None, calls


def _llama3(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    body = text.removeprefix("<|python_tag|>")
    decoder = json.JSONDecoder()
    calls = []
    content = ""
    at = 0
    try:
        while (found := _LLAMA3_CALL.search(body, at)) is not None:
            content += body[at:found.start()]
            arguments, at = decoder.raw_decode(body, found.end())
            closing = re.compile(r"\s*\}").match(body, at)
            if closing is None:
                raise ValueError("the call's object does not close")
            at = closing.end()
            calls.append(_call(found.group(1), arguments))
    except ValueError:
        return text, []
    if not calls:
        return text, []
    content += body[at:]
    return content.strip() or None, calls


def _call(name: Any, arguments: Any) -> dict[str, Any]:
    if not isinstance(name, str):
        raise TypeError("a call's name must be a string")
    return {"id": new_call_id(), "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)}}


def read_native(text: str, fmt: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, calls) of an answer in `fmt` (hermes or llama3): calls as OpenAI
    `tool_calls` entries with JSON-string arguments; text that holds no call is content."""
    return _hermes(text) if fmt == HERMES else _llama3(text)


def template_options(fmt: str) -> dict[str, Any]:
    """Variables a format's templates take besides messages and tools (llama.cpp's choice:
    a Llama 3 template lists the tools in its system message, not the first user message)."""
    return {"tools_in_user_message": False} if fmt == LLAMA3 else {}


def template_tools(tools: list[Tool]) -> list[dict[str, Any]]:
    """`tools` as chat templates read them: OpenAI's `{"type": "function", "function": ...}`."""
    return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                              "parameters": t.parameters}} for t in tools]
