"""Tool calls: what a model writes to call a function, read into OpenAI's `tool_calls`, and the
calls of a chat's history put back into the form the chat template renders.

The families offload runs write each call between <tool_call> and </tool_call>, in one of two forms:
- "json" (Qwen3, Qwen3-Next Instruct):
      <tool_call>
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      </tool_call>
- "xml" (Qwen3-Coder, Qwen3-Coder-Next, the Qwen3.5 family):
      <tool_call>
      <function=get_weather>
      <parameter=city>
      Paris
      </parameter>
      </function>
      </tool_call>
  A parameter's value is text; the tool's JSON schema says what it becomes (an integer, a number,
  a boolean, an object or array written as JSON, null), and text where the schema says nothing or
  the value does not read as its type.

Which form a model writes is read from its chat template (`template_format`): the template that
renders calls in the prompt is what the model was trained to write.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from offload.tokenizer import partial_suffix

OPEN, CLOSE = "<tool_call>", "</tool_call>"
FORMATS = ("json", "xml")
_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>(.*)</function>\s*", re.DOTALL)
# a parameter ends at its closing tag, or (as models sometimes forget it) where the next one or
# the function's end begins
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|(?=</function>)|$)", re.DOTALL)


def _strict_json(text: str) -> Any:
    """json.loads without NaN and Infinity (not JSON: a JavaScript client's JSON.parse fails on them)."""
    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    value = json.loads(text, parse_constant=refuse)
    json.dumps(value, allow_nan=False)  # ValueError for a number beyond a double (1e400: inf), at any depth
    return value


def template_format(template: str | None) -> str | None:
    """The form of tool call a chat template renders (FORMATS), or None if it renders none."""
    if not template:
        return None
    if "<function=" in template:
        return "xml"
    return "json" if OPEN in template else None


@dataclass
class ToolCall:
    index: int  # its place among the answer's calls
    id: str
    name: str
    arguments: str  # a JSON object, as text (OpenAI's `function.arguments`)

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class ToolCallReader:
    """Reads a streamed answer: text outside calls comes out as it arrives (held back only while it
    may be the start of <tool_call>), a call when its closing tag arrives. A call that does not
    parse, or is never closed, comes out as the text it was: nothing the model wrote is lost."""

    def __init__(self, form: str, tools: list[dict[str, Any]] | None = None):
        if form not in FORMATS:
            raise ValueError(f"tool call format {form!r}: one of {', '.join(FORMATS)}")
        self.form = form
        self.types = {name: _parameter_types(tool) for tool in tools or [] if (name := _tool_name(tool))}
        self.pending = ""
        self.inside = False  # pending starts with OPEN
        self.calls = 0
        self.after_call = False  # whitespace right after a call is the model's separator, not content
        self.scanned = 0  # inside a call: where to look for its closing tag from

    def __call__(self, text: str) -> list[str | ToolCall]:
        """Content and calls, in order, that `text` makes ready."""
        self.pending += text
        out: list[str | ToolCall] = []
        while self.pending:
            if self.after_call:
                self.pending = self.pending.lstrip()
                if not self.pending:
                    break
                self.after_call = False
            if not self.inside:
                at = self.pending.find(OPEN)
                if at < 0:
                    ready = len(self.pending) - partial_suffix(self.pending, OPEN)
                    if ready:
                        out.append(self.pending[:ready])
                        self.pending = self.pending[ready:]
                    break
                if at:
                    out.append(self.pending[:at])
                self.pending, self.inside = self.pending[at:], True
            end = self.pending.find(CLOSE, self.scanned)
            if end < 0:
                self.scanned = max(self.scanned, len(self.pending) - len(CLOSE) + 1)
                break
            body = self.pending[len(OPEN):end]
            if self._unfinished(body):  # a </tool_call> inside an argument's text: the call goes on
                self.scanned = end + len(CLOSE)
                continue
            block, self.pending = self.pending[:end + len(CLOSE)], self.pending[end + len(CLOSE):]
            self.inside, self.scanned = False, 0
            call = self.parse(body, self.calls)
            if call is None:
                out.append(block)
            else:
                out.append(call)
                self.calls += 1
                self.after_call = True
        return out

    def flush(self) -> list[str]:
        """What is still held at the end of the answer, as text."""
        out = [self.pending] if self.pending and not (self.after_call and self.pending.isspace()) else []
        self.pending, self.inside, self.scanned = "", False, 0
        return out

    def _unfinished(self, body: str) -> bool:
        """Whether a call's text up to a </tool_call> stops inside a value (a JSON string not yet
        closed; in the xml form, before </function>), so that tag is an argument's text."""
        if self.form == "xml":
            return "<function=" in body and not body.rstrip().endswith("</function>")
        try:
            json.loads(body)
        except json.JSONDecodeError as error:
            return error.msg.startswith("Unterminated string") or error.pos >= len(body.rstrip())
        return False

    def parse(self, body: str, index: int = 0) -> ToolCall | None:
        """One call's text between the tags -> the answer's call `index`, or None if it is not one."""
        parsed = self._json(body) if self.form == "json" else self._xml(body)
        if parsed is None:
            return None
        name, arguments = parsed
        return ToolCall(index, f"call_{uuid.uuid4().hex[:24]}", name,
                        json.dumps(arguments, ensure_ascii=False, allow_nan=False))

    @staticmethod
    def _json(body: str) -> tuple[str, dict] | None:
        try:
            call = _strict_json(body)
        except ValueError:
            return None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
            return None
        arguments = call.get("arguments", call.get("parameters", {}))
        if isinstance(arguments, str):  # arguments written as a JSON string
            try:
                arguments = _strict_json(arguments)
            except ValueError:
                return None
        return (call["name"], arguments) if isinstance(arguments, dict) else None

    def _xml(self, body: str) -> tuple[str, dict] | None:
        function = _FUNCTION.fullmatch(body)
        if function is None:
            return None
        name, inner = function.group(1).strip(), function.group(2)
        if not name or _PARAMETER.sub("", inner).replace("</parameter>", "").strip():  # text outside parameters
            return None
        types = self.types.get(name, {})
        return name, {key.strip(): _typed(_trim(value), types.get(key.strip()))
                      for key, value in _PARAMETER.findall(inner)}


def _tool_name(tool: dict[str, Any]) -> str | None:
    function = tool.get("function") if isinstance(tool, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) else None


def _parameter_types(tool: dict[str, Any]) -> dict[str, str]:
    """A tool's parameter name -> its JSON schema type (the first that is not null)."""
    schema = tool["function"].get("parameters")
    properties = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(properties, dict):
        return {}
    return {name: kind for name, spec in properties.items() if (kind := schema_type(spec)) is not None}


def schema_type(spec: Any) -> str | None:
    """A property schema's type: the first that is not null, of a list of types or of the
    members of anyOf / oneOf (how Optional[...] is written)."""
    if not isinstance(spec, dict):
        return None
    kind = spec.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if isinstance(kind, str):
        return kind
    for union in ("anyOf", "oneOf"):
        members = [schema_type(member) for member in spec.get(union) or [] if isinstance(member, dict)]
        if members:
            return next((k for k in members if k not in (None, "null")), members[0])
    return None


def _trim(value: str) -> str:
    """A parameter's text without the newline the form puts after its opening tag and before its
    closing one."""
    if value.startswith("\n"):
        value = value[1:]
    return value[:-1] if value.endswith("\n") else value


def _typed(value: str, kind: str | None) -> Any:
    """A parameter's text as its schema type says, or the text itself where it does not read so."""
    if kind in (None, "string"):
        return value
    try:
        parsed = _strict_json(value)
    except ValueError:
        if kind == "boolean" and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        return value
    if parsed is None:  # null: no value, whatever the type
        return None
    expected = {"integer": int, "number": (int, float), "boolean": bool, "object": dict, "array": list,
                "null": type(None)}.get(kind)
    if expected is None:
        return parsed
    if isinstance(parsed, bool) and kind in ("integer", "number"):
        return value
    if kind == "integer" and isinstance(parsed, float) and parsed.is_integer():
        return int(parsed)
    return parsed if isinstance(parsed, expected) else value


def history_arguments(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant message of a chat's history with each tool call's `arguments` as a mapping
    where the client sent OpenAI's JSON text: chat templates iterate over them (the xml form) or
    write them with `tojson`."""
    calls = message.get("tool_calls")
    if message.get("role") != "assistant" or not isinstance(calls, list):
        return message
    converted = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            try:
                arguments = json.loads(function["arguments"])
            except ValueError:
                arguments = None
            if isinstance(arguments, dict):
                call = {**call, "function": {**function, "arguments": arguments}}
        converted.append(call)
    return {**message, "tool_calls": converted}
