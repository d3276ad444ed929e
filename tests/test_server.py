"""`offload serve` as clients use it: the real server on a free localhost port, the `openai`
package (sync and streaming) and raw HTTP for the error cases."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import psutil
import pytest
from click.testing import CliRunner

import offload
import offload.server
from offload.cli import main
from offload.sampling import generation_defaults
from offload.server import Http, Service
from offload.tokenizer import Tokenizer

HELLO = [{"role": "user", "content": "Hello! How are you today?"}]


class Running:
    """A server on a thread: its service, base URL and an openai client."""

    def __init__(self, path, worker: bool = True, ctx: int = 512, slots: int = 1, **options):
        engine = offload.load(path, quant=None, ctx=ctx, slots=slots)
        self.service = Service(engine, Tokenizer(path), "tiny", generation_defaults(path), **options)
        if worker:  # without one, requests stay queued: a busy server, held still
            self.service.start()
        self.http = Http(self.service)
        self.url = self.http.url.removesuffix("/v1")
        self.client = openai.OpenAI(base_url=self.http.url, api_key=options.get("api_key") or "none",
                                    max_retries=0, timeout=60)

    def stop(self):
        self.http.stop()
        self.service.stop()

    def __enter__(self) -> Running:
        return self

    def __exit__(self, *_):
        self.stop()


CHATML = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def with_template(source, folder, template: str):
    """A copy of the checkpoint `source` in `folder` whose chat template is `template`."""
    import shutil

    shutil.copytree(source, folder)
    (folder / "chat_template.jinja").write_text(template)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "tiny"
    assert CliRunner().invoke(main, ["synth", "tiny-qwen3-next", str(path)]).exit_code == 0
    return path


@pytest.fixture(scope="module")
def endless(tmp_path_factory):
    """A checkpoint whose answers never stop by themselves (no stop tokens)."""
    path = tmp_path_factory.mktemp("serve") / "endless"
    assert CliRunner().invoke(main, ["synth", "tiny-qwen3-next", str(path)]).exit_code == 0
    (path / "generation_config.json").unlink()
    return path


@pytest.fixture(scope="module")
def server(tiny):
    with Running(tiny) as running:
        yield running


def fresh(server):
    """Forget what the engine holds: the next request prefills from scratch."""
    for session in server.service.scheduler.sessions:
        session.forget()


def test_models_health_and_a_chat_completion(server):
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    assert [m.id for m in server.client.models.list().data] == ["tiny"]
    reply = server.client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, seed=3,
                                                  temperature=0.9)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length") and choice.message.content
    prompt = httpx.post(f"{server.url}/tokenize", json={"messages": HELLO}).json()["tokens"]
    assert reply.usage.prompt_tokens == len(prompt) and 1 <= reply.usage.completion_tokens <= 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    if choice.finish_reason == "length":
        assert reply.usage.completion_tokens == 12


def test_streamed_text_equals_the_whole_answer_for_the_same_seed(server):
    options = dict(model="tiny", messages=HELLO, max_tokens=20, seed=11, temperature=1.0, top_p=0.95)
    whole = server.client.chat.completions.create(**options)
    chunks = list(server.client.chat.completions.create(**options, stream=True,
                                                        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_text_completions_raw_prompt_and_stop_strings(server):
    whole = server.client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=16, temperature=0)
    text = whole.choices[0].text
    assert whole.object == "text_completion" and text
    streamed = "".join(c.choices[0].text for c in server.client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=16, temperature=0, stream=True))
    assert streamed == text
    cut = text[len(text) // 2:][:2]  # a stop string taken from the answer itself
    if cut.strip():
        stopped = server.client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=16,
                                                   temperature=0, stop=[cut])
        assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].text == text[:text.index(cut)]
    ids = httpx.post(f"{server.url}/tokenize", json={"content": "Once upon a time"}).json()["tokens"]
    by_ids = server.client.completions.create(model="tiny", prompt=ids, max_tokens=16, temperature=0)
    assert by_ids.choices[0].text == text
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": ids}).json()["content"] == "Once upon a time"


def test_two_concurrent_clients_both_get_complete_answers(server):
    questions = ["Tell me about rivers.", "What is a mountain?"]
    expected = [server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": q}],
                                                      max_tokens=24, temperature=0).choices[0].message.content
                for q in questions]
    answers = [None, None]

    def ask(i):
        stream = server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": questions[i]}],
                                                       max_tokens=24, temperature=0, stream=True)
        answers[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert answers == expected


def test_prefix_reuse_counts_cached_tokens_and_changes_nothing(server):
    fresh(server)
    first = server.client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=10, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    turn = HELLO + [{"role": "assistant", "content": first.choices[0].message.content},
                    {"role": "user", "content": "And what did you do yesterday?"}]
    second = server.client.chat.completions.create(model="tiny", messages=turn, max_tokens=10, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < second.usage.prompt_tokens  # the first turn was not read again
    again = server.client.chat.completions.create(model="tiny", messages=turn, max_tokens=10, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens  # regenerated
    edited = turn[:-1] + [{"role": "user", "content": "And tomorrow?"}]
    changed = server.client.chat.completions.create(model="tiny", messages=edited, max_tokens=10, temperature=0)
    assert changed.usage.prompt_tokens_details.cached_tokens >= cached  # from the message boundary
    for messages, reply in ((turn, second), (turn, again), (edited, changed)):
        fresh(server)
        alone = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
        assert alone.usage.prompt_tokens_details.cached_tokens == 0
        assert alone.choices[0].message.content == reply.choices[0].message.content


def test_a_thinking_models_think_block_is_reasoning_content(endless, tmp_path):
    """A template that opens <think> in the prompt (as Qwen3's thinking models do): everything up
    to </think> is reasoning_content, whole or streamed; here the random model never closes it."""
    thinking = CHATML.replace("assistant\\n", "assistant\\n<think>\\n")
    with Running(with_template(endless, tmp_path / "thinking", thinking)) as running:
        reply = running.client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, seed=2)
        message = reply.choices[0].message
        assert message.content == "" and message.reasoning_content
        chunks = running.client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, seed=2,
                                                        stream=True)
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == message.reasoning_content
        assert not "".join(d.content or "" for d in deltas)


def test_tools_reach_a_template_that_takes_them(tiny, tmp_path, server):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    with Running(with_template(tiny, tmp_path / "plain", CHATML)) as running:
        refused = httpx.post(f"{running.url}/v1/chat/completions", json={"messages": HELLO, "tools": tools})
        assert refused.status_code == 400 and "does not take tools" in refused.json()["error"]["message"]
    plain = server.client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
    with_tools = server.client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2, tools=tools)
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens  # the tool's schema is in the prompt


WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}, "days": {"type": "integer"}}}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALLS = ('Let me look that up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n'
         '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon"}}\n</tool_call>')


def scripted(running: Running, text: str, monkeypatch) -> None:
    """The model's next answers are `text` and a stop token: each token goes through the real
    engine as if it had been sampled, so everything after the model (detokenising, tool calls,
    the API's shapes) runs as with any answer."""
    service = running.service
    ids = service.tokenizer.encode(text) + [min(service.engine.stop_ids)]

    class Scripted(offload.server.Sampler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.script = iter(ids)  # each answer from the start

        def __call__(self, logits, history):
            return next(self.script)

    monkeypatch.setattr(offload.server, "Sampler", Scripted)


def test_tool_calls_the_model_writes_come_back_as_tool_calls(tiny, monkeypatch):
    """The demo's template (Qwen3's json form): two calls in one answer, whole and streamed (the
    name first, then the arguments), then the agent's next turn with the calls and a tool's result
    in the history, rendered with the arguments as a mapping."""
    with Running(tiny, ctx=2048) as running:  # the tools' instructions are long in the tiny vocabulary
        scripted(running, CALLS, monkeypatch)
        reply = running.client.chat.completions.create(model="tiny", messages=ASK, tools=WEATHER, max_tokens=200)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look that up."
        calls = choice.message.tool_calls
        assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
            ("function", "get_weather", {"city": "Paris", "days": 3}), ("function", "get_weather", {"city": "Lyon"})]
        assert len({c.id for c in calls}) == 2

        streamed, content, finish = {}, "", None
        for chunk in running.client.chat.completions.create(model="tiny", messages=ASK, tools=WEATHER,
                                                            max_tokens=200, stream=True):
            delta = chunk.choices[0].delta
            content += delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
            for part in delta.tool_calls or []:
                if part.index not in streamed:  # the first of a call: its id and name
                    assert part.id and part.type == "function" and part.function.name
                    streamed[part.index] = [part.function.name, part.function.arguments or ""]
                else:
                    assert part.id is None and not part.function.name
                    streamed[part.index][1] += part.function.arguments
        assert finish == "tool_calls" and content.strip() == "Let me look that up."
        assert [streamed[i] for i in sorted(streamed)] == [[c.function.name, c.function.arguments] for c in calls]

        history = ASK + [choice.message.model_dump(exclude_none=True)] + [
            {"role": "tool", "tool_call_id": call.id, "content": f"sunny in {json.loads(call.function.arguments)['city']}"}
            for call in calls]
        prompt = httpx.post(f"{running.url}/tokenize", json={"messages": history}).json()["tokens"]
        rendered = running.service.tokenizer.decode(prompt)
        assert '"arguments": {"city": "Paris", "days": 3}' in rendered and "<tool_response>\nsunny in Lyon" in rendered
        scripted(running, "Sunny in both.", monkeypatch)
        final = running.client.chat.completions.create(model="tiny", messages=history, tools=WEATHER, max_tokens=50)
        assert final.choices[0].finish_reason == "stop" and final.choices[0].message.content == "Sunny in both."
        assert not final.choices[0].message.tool_calls


def test_the_xml_form_and_what_tool_choice_allows(tiny, monkeypatch):
    """--tool-call-format xml reads Qwen3-Coder's form, typed by the tool's schema, and a named
    tool_choice enforces it; tool_choice "none" renders no tools and reads no calls."""
    xml = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n"
           "</parameter>\n</function>\n</tool_call>")
    with Running(tiny, ctx=2048, tool_format="xml") as running:
        scripted(running, xml, monkeypatch)
        reply = running.client.chat.completions.create(model="tiny", messages=ASK, tools=WEATHER, max_tokens=200)
        assert reply.choices[0].finish_reason == "tool_calls" and reply.choices[0].message.content is None
        assert json.loads(reply.choices[0].message.tool_calls[0].function.arguments) == {"city": "Paris", "days": 2}
        plain = running.client.chat.completions.create(model="tiny", messages=ASK, max_tokens=200)
        none = running.client.chat.completions.create(model="tiny", messages=ASK, tools=WEATHER, tool_choice="none",
                                                      max_tokens=200)
        assert none.usage.prompt_tokens == plain.usage.prompt_tokens  # no tools in the prompt
        assert none.choices[0].message.content == xml and not none.choices[0].message.tool_calls
        assert none.choices[0].finish_reason == "stop"
        monkeypatch.undo()  # the model's own draws again
        dial = [{"type": "function", "function": {"name": "dial", "parameters": {
            "type": "object", "required": ["level"], "properties": {"level": {"type": "integer", "maximum": 9}}}}}]
        forced = running.client.chat.completions.create(model="tiny", messages=ASK, tools=WEATHER + dial,
                                                        tool_choice={"type": "function", "function": {"name": "dial"}},
                                                        max_tokens=100, seed=4, temperature=1.0)
        call = forced.choices[0].message.tool_calls[0]  # the xml form, enforced: typed by the schema
        assert call.function.name == "dial" and type(json.loads(call.function.arguments)["level"]) is int
        for choice in ({"type": "function", "function": {"name": "nowhere"}}, "sometimes"):
            refused = httpx.post(f"{running.url}/v1/chat/completions",
                                 json={"messages": ASK, "tools": WEATHER, "tool_choice": choice})
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "tool_choice"
        for tool in ({"name": "f"}, {"type": "function", "function": {"name": "f", "parameters": {"properties": [1]}}},
                     {"type": "function", "function": {"name": "f", "parameters": "none"}}):
            refused = httpx.post(f"{running.url}/v1/chat/completions", json={"messages": ASK, "tools": [tool]})
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "tools.0"
        for shape in ({}, {"type": "json_schema", "json_schema": "forecast"}, {"type": "json_schema",
                                                                             "json_schema": {"schema": [1]}}):
            refused = httpx.post(f"{running.url}/v1/chat/completions", json={"messages": ASK, "response_format": shape})
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "response_format"


def test_logprobs_chat_and_completions_whole_and_streamed(endless):
    """Greedy: each token's log-probability is its list's first; the tokens' bytes are the text;
    streamed entries are the whole answer's; the legacy completions shape lines up with its text."""
    with Running(endless) as running:
        options = dict(model="tiny", messages=HELLO, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
        reply = running.client.chat.completions.create(**options)
        entries = reply.choices[0].logprobs.content
        assert len(entries) == reply.usage.completion_tokens == 6
        spelled = b"".join(bytes(e.bytes) for e in entries).decode(errors="replace")
        content = reply.choices[0].message.content  # without a last character the answer stopped inside
        assert spelled.startswith(content) and spelled[len(content):] in ("", "\ufffd")
        for entry in entries:
            assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
            assert entry.token == entry.top_logprobs[0].token and entry.logprob == entry.top_logprobs[0].logprob
            assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        streamed = [e for chunk in running.client.chat.completions.create(**options, stream=True)
                    if chunk.choices and chunk.choices[0].logprobs for e in chunk.choices[0].logprobs.content]
        assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]
        plain = running.client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=0)
        assert plain.choices[0].logprobs is None and plain.choices[0].message.content == reply.choices[0].message.content

        text = running.client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0,
                                                 logprobs=2)
        legacy = text.choices[0].logprobs
        spelled = "".join(legacy.tokens)
        assert spelled.startswith(text.choices[0].text) and len(spelled) - len(text.choices[0].text) <= 1
        assert len(legacy.token_logprobs) == 5
        assert legacy.text_offset == [sum(len(t) for t in legacy.tokens[:i]) for i in range(5)]
        assert all(len(top) <= 2 and max(top.values()) == pytest.approx(lp) for top, lp in
                   zip(legacy.top_logprobs, legacy.token_logprobs))
        for bad in ({"top_logprobs": 2}, {"logprobs": True, "top_logprobs": 21}):
            refused = httpx.post(f"{running.url}/v1/chat/completions", json={"messages": HELLO, **bad})
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "top_logprobs"


FORECAST = {"type": "object", "additionalProperties": False, "required": ["city", "days", "metric", "sky"],
            "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "minimum": 1,
                                                                                  "maximum": 7},
                           "metric": {"type": "boolean"}, "sky": {"enum": ["clear", "cloudy", "rain"]}}}


def forecast_valid(value) -> bool:
    return isinstance(value, dict) and set(value) == set(FORECAST["required"]) and isinstance(value["city"], str) \
        and len(value["city"]) <= 12 and type(value["days"]) is int and 1 <= value["days"] <= 7 \
        and isinstance(value["metric"], bool) and value["sky"] in ("clear", "cloudy", "rain")


def test_a_json_schema_answer_is_valid_json_under_the_schema(tiny):
    """Random weights, sampled at temperature 1: every answer is the schema's JSON, whole or
    streamed (the same tokens for the same seed); a schema llguidance cannot take is a 400 that
    names what, never an answer that ignores it."""
    shape = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": FORECAST, "strict": True}}
    with Running(tiny, ctx=2048) as running:
        for seed in range(3):
            reply = running.client.chat.completions.create(model="tiny", messages=ASK, response_format=shape,
                                                           max_tokens=200, seed=seed, temperature=1.0)
            assert reply.choices[0].finish_reason == "stop"
            assert forecast_valid(json.loads(reply.choices[0].message.content)), reply.choices[0].message.content
        chunks = running.client.chat.completions.create(model="tiny", messages=ASK, response_format=shape,
                                                        max_tokens=200, seed=0, temperature=1.0, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        first = running.client.chat.completions.create(model="tiny", messages=ASK, response_format=shape,
                                                       max_tokens=200, seed=0, temperature=1.0)
        assert streamed == first.choices[0].message.content
        text = running.client.completions.create(model="tiny", prompt="Forecast:", max_tokens=200, seed=1,
                                                 temperature=1.0, extra_body={"response_format": shape})
        assert forecast_valid(json.loads(text.choices[0].text))
        for bad, named in [({"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=a)b"}}},
                            "look-around"), ({"type": "object", "if": {"required": ["a"]}, "then": {}}, "if")]:
            refused = httpx.post(f"{running.url}/v1/chat/completions", json={"messages": ASK, "response_format": {
                "type": "json_schema", "json_schema": {"name": "x", "schema": bad}}})
            assert refused.status_code == 400 and named in refused.json()["error"]["message"]
            assert refused.json()["error"]["param"] == "response_format"
        refused = httpx.post(f"{running.url}/v1/chat/completions",
                             json={"messages": ASK, "response_format": {"type": "yaml"}})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "response_format"


def test_an_agent_round_trip_with_a_required_tool_call(tiny):
    """The whole loop an agent framework runs, through the openai client, on random weights:
    tools with tool_choice "required" -> a valid call of one of them (arguments under its
    schema) -> the tool's result in the history -> the next answer; a named choice calls that one."""
    tools = WEATHER + [{"type": "function", "function": {"name": "forecast", "parameters": FORECAST}}]
    with Running(tiny, ctx=2048) as running:
        for seed in range(2):
            reply = running.client.chat.completions.create(model="tiny", messages=ASK, tools=tools,
                                                           tool_choice="required", max_tokens=300, seed=seed,
                                                           temperature=1.0)
            choice = reply.choices[0]
            assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
            call = choice.message.tool_calls[0]
            arguments = json.loads(call.function.arguments)
            assert call.function.name in ("get_weather", "forecast")
            if call.function.name == "forecast":
                assert forecast_valid(arguments)
        named = running.client.chat.completions.create(model="tiny", messages=ASK, tools=tools, max_tokens=300,
                                                       tool_choice={"type": "function",
                                                                    "function": {"name": "forecast"}})
        call = named.choices[0].message.tool_calls[0]
        assert call.function.name == "forecast" and forecast_valid(json.loads(call.function.arguments))
        history = ASK + [named.choices[0].message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.id, "content": "clear, 21 C"}]
        final = running.client.chat.completions.create(model="tiny", messages=history, tools=tools, max_tokens=8)
        assert final.choices[0].finish_reason in ("stop", "length", "tool_calls")
        assert final.usage.prompt_tokens > named.usage.prompt_tokens  # the call and its result went back in


def test_a_client_that_disconnects_frees_the_engine(endless):
    with Running(endless) as running:
        with httpx.stream("POST", f"{running.url}/v1/chat/completions", timeout=60,
                          json={"messages": HELLO, "max_tokens": 400, "stream": True}) as response:
            lines = response.iter_lines()
            received = [line for line, _ in zip(lines, range(6)) if line.startswith("data:")]
        assert len(received) >= 2  # it was generating; now the client is gone
        started = time.time()
        reply = running.client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3)
        assert time.time() - started < 10 and reply.usage.completion_tokens == 3
        deadline = time.time() + 5  # the worker lets go of a job just after its last event
        while running.service.active and time.time() < deadline:
            time.sleep(0.01)
        assert not running.service.active and running.service.waiting == 0


def test_parallel_slots_answer_beside_a_long_answer_and_free_on_disconnect(endless):
    """Two slots: a short request is answered while a long one streams (its tokens keep coming),
    /slots says what each slot does, and the long one's disconnect frees its slot."""
    with Running(endless, slots=2) as running:
        assert httpx.get(f"{running.url}/health").json()["slots"] == 2
        alone = running.client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5, temperature=0)
        with httpx.stream("POST", f"{running.url}/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": "Go on and on."}], "max_tokens": 400,
                                "stream": True}) as response:
            lines = response.iter_lines()
            assert len([line for line, _ in zip(lines, range(6)) if line.startswith("data:")]) >= 2
            states = [slot["state"] for slot in httpx.get(f"{running.url}/slots").json()["slots"]]
            assert sorted(states) == ["answer", "idle"]
            beside = running.client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5, temperature=0)
            assert beside.choices[0].message.content == alone.choices[0].message.content
            assert len([line for line, _ in zip(lines, range(6)) if line.startswith("data:")]) >= 2  # still streaming
        deadline = time.time() + 10
        while running.service.active and time.time() < deadline:
            time.sleep(0.01)
        assert not running.service.active
        assert [slot["state"] for slot in httpx.get(f"{running.url}/slots").json()["slots"]] == ["idle", "idle"]


def test_a_full_queue_is_answered_429(endless):
    with Running(endless, max_queue=0) as running:  # no request may wait, but an idle server serves one
        assert running.client.completions.create(model="tiny", prompt="go", max_tokens=2).usage.completion_tokens == 2
    with Running(endless, worker=False, max_queue=1) as running:  # one runs (when a worker takes it), one waits
        request = {"prompt": "go", "max_tokens": 2, "stream": True}
        with httpx.stream("POST", f"{running.url}/v1/completions", timeout=60, json=request) as first, \
                httpx.stream("POST", f"{running.url}/v1/completions", timeout=60, json=request) as second:
            assert first.status_code == second.status_code == 200 and running.service.waiting == 2
            refused = httpx.post(f"{running.url}/v1/completions", json={"prompt": "go", "max_tokens": 2})
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
    with Running(endless, worker=False, max_queue=0, slots=2) as running:  # two slots: two queued need no wait
        request = {"prompt": "go", "max_tokens": 2, "stream": True}
        with httpx.stream("POST", f"{running.url}/v1/completions", timeout=60, json=request) as first, \
                httpx.stream("POST", f"{running.url}/v1/completions", timeout=60, json=request) as second:
            assert first.status_code == second.status_code == 200 and running.service.waiting == 2
            refused = httpx.post(f"{running.url}/v1/completions", json={"prompt": "go", "max_tokens": 2})
        assert refused.status_code == 429


def error_of(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_bad_requests_get_openai_errors(server):
    url = f"{server.url}/v1/chat/completions"
    for variable in ("messages", "add_generation_prompt"):  # the server's own template variables
        error = error_of(httpx.post(url, json={"messages": HELLO, "chat_template_kwargs": {variable: []}}), 400)
        assert variable in error["message"] and error["param"] == "chat_template_kwargs"
    error = error_of(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert "not valid JSON" in error["message"]
    assert "temperature" in error_of(httpx.post(url, json={"messages": HELLO, "temperature": "hot"}), 400)["message"]
    assert "temperature" in error_of(httpx.post(url, json={"messages": HELLO, "temperature": 7}), 400)["message"]
    assert "messages" in error_of(httpx.post(url, json={"messages": []}), 400)["message"]
    assert "messages" in error_of(httpx.post(url, json={"messages": "hi"}), 400)["message"]
    assert "role" in error_of(httpx.post(url, json={"messages": [{"role": "wizard", "content": "x"}]}), 400)["message"]
    assert "seed" in error_of(httpx.post(url, json={"messages": HELLO, "seed": 2**70}), 400)["message"]
    assert "n=2" in error_of(httpx.post(url, json={"messages": HELLO, "n": 2}), 400)["message"]
    long = [{"role": "user", "content": "word " * 2000}]
    error = error_of(httpx.post(url, json={"messages": long}), 400)
    assert "context holds 512" in error["message"] and error["code"] == "context_length_exceeded"
    assert error_of(httpx.get(f"{server.url}/v1/nothing"), 404)["type"] == "not_found_error"
    assert "token ids" in error_of(httpx.post(f"{server.url}/v1/completions", json={"prompt": [10**9]}), 400)["message"]
    # unknown fields are ignored, as OpenAI clients send fields a server may not use
    assert httpx.post(url, json={"messages": HELLO, "max_tokens": 2, "user": "me", "logit_bias": {}}).status_code == 200


def test_an_api_key_is_required_when_set(tiny):
    with Running(tiny, api_key="sesame") as running:
        assert error_of(httpx.get(f"{running.url}/v1/models"), 401)["code"] == "invalid_api_key"
        assert httpx.get(f"{running.url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert [m.id for m in running.client.models.list().data] == ["tiny"]
        assert httpx.get(f"{running.url}/health").status_code == 200


def test_a_soak_of_mixed_requests_leaves_the_server_answering(server):
    process = psutil.Process()
    url = f"{server.url}/v1/chat/completions"
    bodies = [{"messages": HELLO, "max_tokens": 3},
              {"messages": HELLO, "max_tokens": 3, "stream": True},
              {"messages": [{"role": "user", "content": "Count to three."}], "max_tokens": 3, "temperature": 0.7},
              {"messages": []}, {"messages": HELLO, "top_p": 0}, b"{]"]

    def send(i):
        body = bodies[i % len(bodies)]
        if isinstance(body, bytes):
            return httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=60)
        return httpx.post(url, json=body, timeout=60)

    for i in range(24):  # warm: compiled kernels, allocator pools
        send(i)
    before = process.memory_info().rss
    statuses = [send(i).status_code for i in range(200)]
    assert statuses.count(200) > 60 and set(statuses) <= {200, 400}
    assert process.memory_info().rss < 1.10 * before
    reply = server.client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
    assert reply.usage.completion_tokens == 2


def test_a_concurrent_soak_on_slots_keeps_memory_flat(tiny):
    """Three slots, four clients at once sending mixed requests (whole, streamed, streams left after
    their first chunk, seeded, malformed) with prompts that continue or not: every slot ends idle,
    memory is flat, the server still answers."""
    with Running(tiny, slots=3, snapshots=2) as running:
        process = psutil.Process()
        url = f"{running.url}/v1/chat/completions"
        prompts = [HELLO, [{"role": "user", "content": "Count to three."}],
                   [{"role": "user", "content": "Name a river and a mountain, then stop."}]]

        def client(worker: int, requests: int) -> list[int]:
            statuses = []
            for i in range(requests):
                body = {"messages": prompts[(worker + i) % 3], "max_tokens": 2 + (worker + i) % 5}
                kind = (worker + i) % 4
                if kind == 1:
                    body.update(seed=i, temperature=0.8)
                if kind == 2:  # streamed, left after its first chunk
                    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as response:
                        next(response.iter_lines())
                        statuses.append(response.status_code)
                    continue
                if kind == 3 and i % 8 == 3:
                    body = {"messages": []}
                statuses.append(httpx.post(url, json=body, timeout=60).status_code)
            return statuses

        def wave(requests: int) -> list[int]:
            results: list[list[int]] = [[] for _ in range(4)]
            threads = [threading.Thread(target=lambda w=w: results[w].extend(client(w, requests))) for w in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=300)
            return [status for statuses in results for status in statuses]

        wave(6)  # warm: compiled kernels, allocator pools
        before = process.memory_info().rss
        statuses = wave(40)
        assert len(statuses) == 160 and statuses.count(200) > 120 and set(statuses) <= {200, 400}
        assert process.memory_info().rss < 1.10 * before
        deadline = time.time() + 10
        while running.service.active and time.time() < deadline:
            time.sleep(0.01)
        assert [slot["state"] for slot in httpx.get(f"{running.url}/slots").json()["slots"]] == ["idle"] * 3
        assert running.client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2).usage.completion_tokens == 2


def test_offload_serve_starts_prints_its_url_and_stops_on_ctrl_c(tiny):
    env = dict(os.environ, OFFLOAD_CACHE=str(tiny.parent / "cache"))
    command = [sys.executable, "-m", "offload", "serve", "--model", str(tiny), "--quant", "none",
               "--port", "0", "--ctx", "256"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = None
        for line in process.stderr:
            if line.startswith("serving"):
                url = line.split(" at ")[1].split()[0]
                break
        assert url and url.endswith("/v1")
        models = httpx.get(f"{url}/models", timeout=30).json()
        assert models["data"][0]["id"] == "tiny"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0 and "stopped" in process.stderr.read()
    finally:
        process.kill()
    # a busy port is one line, before the model loads
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = command[:-3] + [str(holder.getsockname()[1]), "--ctx", "256"]
        result = subprocess.run(busy, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 1 and result.stderr.strip().startswith("error: cannot listen on")
    assert "loading" not in result.stderr
