"""Tool calls read out of an answer (`offload.tools`): both forms, whole and split at every
point a stream may split them, typed by the tool's schema, and malformed calls kept as text."""

from __future__ import annotations

import json
import random

import pytest

from offload.synthetic import CHAT_TEMPLATE
from offload.tools import ToolCall, ToolCallReader, history_arguments, template_format

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
    "threshold": {"type": ["number", "null"]}, "hours": {"type": "array"}, "where": {"type": "object"}}}}}

JSON_ANSWER = ('Let me look that up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n'
               '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "Europe/Paris"}}\n</tool_call>')
XML_ANSWER = ("I will check.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nNew York\n</parameter>\n"
              "<parameter=days>\n5\n</parameter>\n<parameter=metric>\nfalse\n</parameter>\n<parameter=threshold>\n"
              "0.5\n</parameter>\n<parameter=hours>\n[6, 12]\n</parameter>\n<parameter=where>\n{\"lat\": 40.7}\n"
              "</parameter>\n<parameter=note>\nline one\nline two\n</parameter>\n</function>\n</tool_call>")


def read(form: str, text: str, pieces: list[int] | None = None) -> tuple[str, list[ToolCall]]:
    """Everything the reader gives for `text` fed in pieces of the given lengths (whole: one)."""
    reader = ToolCallReader(form, [WEATHER])
    out, at = [], 0
    for length in pieces or [len(text)]:
        out += reader(text[at:at + length])
        at += length
    out += reader.flush()
    return "".join(p for p in out if isinstance(p, str)), [p for p in out if isinstance(p, ToolCall)]


def splits(text: str, seed: int) -> list[int]:
    rng = random.Random(seed)
    lengths = []
    while sum(lengths) < len(text):
        lengths.append(rng.randint(1, 7))
    return lengths


def test_the_json_form_whole_and_split_anywhere():
    content, calls = read("json", JSON_ANSWER)
    assert content == "Let me look that up.\n"
    assert [(c.index, c.name, json.loads(c.arguments)) for c in calls] == [
        (0, "get_weather", {"city": "Paris", "days": 3}), (1, "get_time", {"zone": "Europe/Paris"})]
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id
    for seed in range(20):  # a stream splits the text anywhere, tags included
        split_content, split_calls = read("json", JSON_ANSWER, splits(JSON_ANSWER, seed))
        assert split_content == content
        assert [(c.name, c.arguments) for c in split_calls] == [(c.name, c.arguments) for c in calls]


def test_the_xml_form_typed_by_the_tools_schema():
    content, calls = read("xml", XML_ANSWER)
    assert content == "I will check.\n" and len(calls) == 1 and calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments) == {"city": "New York", "days": 5, "metric": False, "threshold": 0.5,
                                              "hours": [6, 12], "where": {"lat": 40.7},
                                              "note": "line one\nline two"}  # not in the schema: text
    for seed in range(20):
        assert read("xml", XML_ANSWER, splits(XML_ANSWER, seed))[1][0].arguments == calls[0].arguments


def test_values_that_do_not_read_as_their_type_stay_text():
    text = ("<tool_call>\n<function=get_weather>\n<parameter=days>\nthree\n</parameter>\n<parameter=metric>\nTrue\n"
            "</parameter>\n<parameter=hours>\n[6,\n</parameter>\n<parameter=city>\n42\n</parameter>\n</function>\n"
            "</tool_call>")
    _, calls = read("xml", text)
    assert json.loads(calls[0].arguments) == {"days": "three", "metric": True, "hours": "[6,", "city": "42"}


def test_a_closing_tag_inside_an_argument_does_not_end_the_call():
    """An agent editing a file that holds the tag itself: the call ends at the tag after the value."""
    json_text = ('<tool_call>\n{"name": "write", "arguments": {"text": "a </tool_call> b"}}\n</tool_call>')
    xml_text = ("<tool_call>\n<function=write>\n<parameter=text>\na </tool_call> b\n</parameter>\n</function>\n"
                "</tool_call>")
    for form, text in (("json", json_text), ("xml", xml_text)):
        for pieces in (None, splits(text, 3)):
            content, calls = read(form, text, pieces)
            assert content == "" and json.loads(calls[0].arguments) == {"text": "a </tool_call> b"}


def test_the_xml_forms_loose_ends():
    """A parameter whose closing tag the model forgot ends where the next begins; Optional[int]
    (anyOf with null) reads as an integer; null is None."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "n": {"anyOf": [{"type": "integer"}, {"type": "null"}]}, "m": {"type": "integer"}, "s": {"type": "string"}}}}}
    text = ("<tool_call>\n<function=f>\n<parameter=n>\n4\n<parameter=m>\nnull\n</parameter>\n<parameter=s>\nx\n"
            "</function>\n</tool_call>")
    reader = ToolCallReader("xml", [tool])
    calls = [part for part in reader(text) + reader.flush() if isinstance(part, ToolCall)]
    assert json.loads(calls[0].arguments) == {"n": 4, "m": None, "s": "x"}


def test_arguments_are_always_valid_json():
    """NaN, Infinity and numbers beyond a double are not JSON: a call holding them stays text (json
    form), a parameter holding them stays its text (xml form)."""
    for text in ('<tool_call>\n{"name": "f", "arguments": {"x": NaN}}\n</tool_call>',
                 '<tool_call>\n{"name": "f", "arguments": {"x": 1e400}}\n</tool_call>'):
        assert read("json", text) == (text, [])
    xml = "<tool_call>\n<function=get_weather>\n<parameter=threshold>\nInfinity\n</parameter>\n</function>\n</tool_call>"
    assert json.loads(read("xml", xml)[1][0].arguments) == {"threshold": "Infinity"}
    xml = xml.replace("Infinity", "1e400")
    assert json.loads(read("xml", xml)[1][0].arguments) == {"threshold": "1e400"}


@pytest.mark.parametrize("form, text", [
    ("json", '<tool_call>\n{"name": get_weather}\n</tool_call>'),  # not JSON
    ("json", '<tool_call>\n["get_weather"]\n</tool_call>'),  # not a call
    ("json", '<tool_call>\n{"name": "get_weather", "arguments": "{broken"}\n</tool_call>'),
    ("json", 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa'),  # never closed
    ("xml", "<tool_call>\n<function=get_weather>\nParis\n</function>\n</tool_call>"),  # text outside parameters
    ("xml", '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>'),  # the other form
])
def test_a_malformed_call_stays_text(form, text):
    assert read(form, text) == (text, [])
    assert read(form, text, splits(text, 1)) == (text, [])


def test_text_after_a_call_and_lookalike_tags_stay_content():
    text = 'A <tool_ca tag that is not one.\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n\nDone.'
    content, calls = read("json", text)
    assert content == "A <tool_ca tag that is not one.\nDone." and [c.name for c in calls] == ["f"]


def test_the_format_comes_from_the_chat_template():
    assert template_format(CHAT_TEMPLATE) == "json"  # the demo's: Qwen3's form
    assert template_format("{{- '<tool_call>\\n<function=' + name + '>' }}") == "xml"
    assert template_format("{{ messages }}") is None and template_format(None) is None
    with pytest.raises(ValueError, match="one of json, xml"):
        ToolCallReader("yaml")


def test_history_calls_get_their_arguments_as_mappings():
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    broken = {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{x"}}
    message = history_arguments({"role": "assistant", "content": "", "tool_calls": [call, broken]})
    assert message["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    assert message["tool_calls"][1] == broken  # left as the client sent it
    assert call["function"]["arguments"] == '{"x": 1}'  # the request's own message is not changed
    user = {"role": "user", "content": "hi"}
    assert history_arguments(user) is user
