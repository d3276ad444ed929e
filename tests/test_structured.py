"""Structured output (`offload.structured`): a sampler held to a grammar by llguidance's masks,
drawing from random logits, always writes what the grammar allows, then the end token."""

from __future__ import annotations

import json

import pytest
import torch

from offload.sampling import Sampler, SamplingParams
from offload.structured import GrammarError, Grammars
from offload.synthetic import write_tokenizer
from offload.tokenizer import Tokenizer
from offload.tools import ToolCall, ToolCallReader

VOCAB = 600  # the model's rows: more than the tokenizer's, as real checkpoints pad theirs
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "size", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 10}, "size": {"type": "integer", "minimum": 0},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}}


@pytest.fixture(scope="module")
def grammars(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(path, 512)
    tokenizer = Tokenizer(path)
    return tokenizer, Grammars(tokenizer, VOCAB, tokenizer.backend.token_to_id("<|im_end|>"))


def draw(tokenizer, grammars, constraint, seed: int, limit: int = 400) -> str:
    sampler = Sampler(SamplingParams(temperature=1.0, seed=seed), constraint=constraint)
    logits_of = torch.Generator().manual_seed(seed)
    ids = []
    for _ in range(limit):
        logits = torch.randn(VOCAB, generator=logits_of) * 3
        kept = logits.clone()
        token = sampler(logits)
        assert torch.equal(logits, kept)  # the caller's logits are not masked in place
        if token == grammars.end:
            return tokenizer.decode(ids)
        assert token < tokenizer.vocab_size  # never a padding row
        ids.append(token)
    raise AssertionError(f"no end after {limit} tokens: {tokenizer.decode(ids)!r}")


def test_random_draws_under_a_schema_are_its_json(grammars):
    tokenizer, grammars = grammars
    for seed in range(8):
        value = json.loads(draw(tokenizer, grammars, grammars.json_schema(SCHEMA), seed))
        assert set(value) == {"name", "size", "tags"} and len(value["name"]) <= 10
        assert type(value["size"]) is int and value["size"] >= 0 and set(value["tags"]) <= {"a", "b"}


def test_random_draws_of_a_required_call_are_a_call_of_one_tool(grammars):
    """A tool's arguments are closed to its declared parameters unless its schema says otherwise
    (as clients write them: no additionalProperties), and a tool without parameters takes {}."""
    tokenizer, grammars = grammars
    declared = {key: value for key, value in SCHEMA.items() if key != "additionalProperties"}
    tools = [{"type": "function", "function": {"name": "make", "parameters": declared}},
             {"type": "function", "function": {"name": "ping"}}]
    for seed in range(6):
        text = draw(tokenizer, grammars, grammars.tool_call(tools), seed)
        assert text.startswith("<tool_call>\n") and text.endswith("\n</tool_call>")
        call = json.loads(text[len("<tool_call>\n"):-len("\n</tool_call>")])
        assert call["name"] in ("make", "ping")
        assert set(call["arguments"]) == ({"name", "size", "tags"} if call["name"] == "make" else set())


XML_TOOLS = [{"type": "function", "function": {"name": "set", "parameters": {
    "type": "object", "required": ["mode", "count"], "properties": {
        "mode": {"enum": ["fast", "safe"]}, "count": {"type": "integer", "minimum": 1, "maximum": 99},
        "force": {"type": "boolean"}, "at": {"$ref": "#/$defs/point"}},
    "$defs": {"point": {"type": "array", "items": {"type": "integer"}, "maxItems": 2}}}}},
    {"type": "function", "function": {"name": "write", "parameters": {
        "type": "object", "required": ["path", "text"], "properties": {"path": {"type": "string"},
                                                                       "text": {"type": "string"}}}}}]


def test_random_draws_of_a_required_xml_call_are_a_typed_call(grammars):
    """Qwen3-Coder's form, the set tool alone (its values bounded, so random logits end): every
    draw is a call the xml reader reads, typed as the schema says."""
    tokenizer, grammars = grammars
    for seed in range(6):
        text = draw(tokenizer, grammars, grammars.tool_call(XML_TOOLS[:1], "xml"), seed)
        reader = ToolCallReader("xml", XML_TOOLS)
        calls = [part for part in reader(text) + reader.flush() if isinstance(part, ToolCall)]
        assert len(calls) == 1 and calls[0].name == "set", text
        arguments = json.loads(calls[0].arguments)
        assert arguments["mode"] in ("fast", "safe") and 1 <= arguments["count"] <= 99
        assert set(arguments) <= {"mode", "count", "force", "at"}


def test_a_required_xml_call_takes_text_values_up_to_their_closing_tag(grammars):
    """A string parameter is the form's text, newlines and tags included, until </parameter>."""
    tokenizer, grammars = grammars
    answer = ("<tool_call>\n<function=write>\n<parameter=path>\nsrc/a.py\n</parameter>\n<parameter=text>\n"
              "def f():\n    return '<b>'\n</parameter>\n</function>\n</tool_call>")
    constraint = grammars.tool_call(XML_TOOLS, "xml")
    for token in tokenizer.encode(answer):
        assert constraint.mask(torch.zeros(VOCAB))[token] == 0, tokenizer.decode([token])
        constraint.advance(token)
    assert constraint.mask(torch.zeros(VOCAB))[grammars.end] == 0  # complete: the end is allowed


def test_what_the_grammar_engine_cannot_take_is_named(grammars):
    _, grammars = grammars
    with pytest.raises(GrammarError, match="look-around"):
        grammars.json_schema({"type": "string", "pattern": "(?=a)"})
    with pytest.raises(GrammarError, match="Invalid type"):
        grammars.json_schema({"type": "strng"})
