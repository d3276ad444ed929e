"""Structured output: each draw limited to the tokens a grammar allows next.

A request's `response_format` (`json_object`, `json_schema`) or a `tool_choice` that requires a
call becomes a grammar, and a `Constraint` follows the answer through it: before each draw it
puts -inf on every token the grammar does not allow next, after it the drawn token advances the
grammar; once the grammar is complete only the end-of-answer token is allowed. The grammar engine
is llguidance (JSON schema to a lexer and Earley parser over the tokenizer's byte strings): a
mask costs tens of microseconds a token, its JSON schema coverage is broad, and what it does not
support it names, which becomes a 400 rather than an answer that ignores the schema. JSON is
written as models write it (", " and ": " between items) with no free runs of whitespace for a
sampler to wander in.
"""

from __future__ import annotations

import json
from typing import Any

import llguidance
import llguidance.numpy
import numpy as np
import torch

from offload.errors import OffloadError
from offload.tokenizer import Tokenizer
from offload.tools import schema_type

# JSON as models write it: ", " and ": " between items, no free runs of whitespace to wander in
_TIGHT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(OffloadError):
    """A schema or grammar llguidance does not take: the message names what."""


class Grammars:
    """Grammars over one model's tokens: the tokenizer as llguidance reads it is built once (about
    a second for a 150k vocabulary) and shared by every request's `Constraint`."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, end: int):
        self.vocab_size, self.end = vocab_size, end
        self.tokenizer = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=end)
        # the tool call's tags: a token of their own where the vocabulary has one (Qwen's do),
        # which the model writes instead of the tag's characters
        self.tags = [f"<[{token}]>" if (token := tokenizer.backend.token_to_id(tag)) is not None else json.dumps(tag)
                     for tag in ("<tool_call>", "</tool_call>")]

    def json_schema(self, schema: dict[str, Any]) -> Constraint:
        """An answer that is one JSON value valid under `schema` ({"type": "object"}: any object)."""
        return self._constraint(llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_TIGHT))

    def tool_call(self, tools: list[dict[str, Any]], form: str = "json") -> Constraint:
        """An answer that is one call of one of `tools` (OpenAI function tools) in `form`
        (`offload.tools.FORMATS`), its arguments valid under the tool's parameters' schema."""
        opening, closing = self.tags
        if form == "json":
            calls = [{"type": "object", "properties": {
                "name": {"const": tool["function"]["name"]}, "arguments": _arguments_schema(tool)},
                "required": ["name", "arguments"], "additionalProperties": False} for tool in tools]
            schema = {**(calls[0] if len(calls) == 1 else {"anyOf": calls}), "x-guidance": _TIGHT}
            return self._constraint(f'start: {opening} "\\n" %json {json.dumps(schema)} "\\n" {closing}')
        # xml: <function=NAME>, then each parameter in the schema's order (the required ones
        # always, the others optionally) as <parameter=P>, its value, </parameter>: text up to the
        # closing tag for a string, JSON under its own schema for anything else
        rules = ["start: " + " | ".join(f"call_{i}" for i in range(len(tools)))]
        end_parameter, end_function = _lark("\n</parameter>\n"), _lark("</function>\n")
        for i, tool in enumerate(tools):
            schema = tool["function"].get("parameters") or {}
            required = set(schema.get("required") or [])
            parts = []
            shared = {key: schema[key] for key in ("$defs", "definitions") if key in schema}  # what $refs name
            for j, (name, spec) in enumerate((schema.get("properties") or {}).items()):
                choices = spec.get("enum") if isinstance(spec, dict) else None
                if isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices):
                    value = "(" + " | ".join(_lark(choice) for choice in choices) + ") " + end_parameter
                elif _as_text(spec):  # the form's text (a string's other bounds are not held), which
                    value = 'text "\\n"'  # ends where the model writes the closing tag: the stop
                else:
                    value = "%json " + json.dumps({**spec, **shared, "x-guidance": _TIGHT}) + " " + end_parameter
                start_parameter = _lark(f"<parameter={name}>\n")
                rules.append(f"p_{i}_{j}: {start_parameter} {value}")
                parts.append(f"p_{i}_{j}" if name in required else f"p_{i}_{j}?")
            function = _lark(f"\n<function={tool['function']['name']}>\n")
            rules.append(f"call_{i}: {opening} {function} {' '.join(parts)} {end_function} {closing}")
        rules.append('text[stop="\\n</parameter>"]: /(?s:.*)/')
        return self._constraint("\n".join(rules))

    def _constraint(self, grammar: str) -> Constraint:
        matcher = llguidance.LLMatcher(self.tokenizer, grammar)  # compiles it
        if matcher.is_error():
            raise GrammarError(" ".join(line.strip() for line in matcher.get_error().splitlines()
                                        if line.strip() and set(line.strip()) != {"^"}))  # one line
        return Constraint(matcher, self.vocab_size)


class Constraint:
    """One answer's way through a grammar: `mask` before a draw, `advance` after it."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        self.matcher, self.vocab_size = matcher, vocab_size
        self.bitmask = llguidance.numpy.allocate_token_bitmask(1, vocab_size)  # int32 words, bit t: token t

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """A float32 copy of logits [V] with -inf on the tokens the grammar does not allow next."""
        if self.matcher.is_error():
            raise OffloadError(f"structured output failed: {self.matcher.get_error()}")
        llguidance.numpy.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        allowed = np.unpackbits(self.bitmask[0].view(np.uint8), bitorder="little")[:self.vocab_size]
        logits = logits.float().clone()  # the caller's (a snapshot's) logits stay as they were
        logits[torch.from_numpy(allowed == 0)] = float("-inf")
        return logits

    def advance(self, token: int) -> None:
        """The drawn token moves the grammar on (the end-of-answer token is accepted once complete)."""
        if not self.matcher.is_stopped() and not self.matcher.consume_token(token):
            raise OffloadError(f"structured output failed: {self.matcher.get_error()}")


def _lark(text: str) -> str:
    """A Lark string literal of `text`."""
    return json.dumps(text, ensure_ascii=False)


def _as_text(spec: Any) -> bool:
    """Whether a parameter's value is written as the xml form's plain text: a string, or a
    parameter whose schema says nothing of its value (as the reader takes it)."""
    if not isinstance(spec, dict):
        return True
    kind = schema_type(spec)
    return kind == "string" or kind is None and not any(
        key in spec for key in ("$ref", "anyOf", "oneOf", "allOf", "const", "enum", "properties", "items"))


def _arguments_schema(tool: dict[str, Any]) -> dict[str, Any]:
    """A tool's arguments as an enforced call may write them: its parameters' schema, closed to
    the parameters it declares unless it says otherwise (a function has no use for others, and a
    sampler left free to invent keys may never stop); no parameters: {}. As the xml form's grammar,
    which only ever writes declared parameters."""
    schema = tool["function"].get("parameters") or {"type": "object", "properties": {}}
    open_ended = ("additionalProperties", "patternProperties", "anyOf", "oneOf", "allOf", "$ref")
    if schema.get("type") == "object" and not any(key in schema for key in open_ended):
        schema = {**schema, "additionalProperties": False}
    return schema
