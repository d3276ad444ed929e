"""What a person touches: `offload run` with text, the tokenizer and chat template, a chat's
turns, and the errors of a first try."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

import offload
from offload.cli import main
from offload.conversation import Conversation
from offload.tokenizer import Detokenizer, ThinkingFilter, Tokenizer, TokenizerError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Qwen3-Next checkpoint with offload synth's tokenizer and ChatML template."""
    path = tmp_path_factory.mktemp("front") / "tiny"
    result = CliRunner().invoke(main, ["synth", "tiny-qwen3-next", str(path)])
    assert result.exit_code == 0, result.output
    return path


@pytest.fixture
def runner(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path / "cache"))
    return CliRunner()


def run(runner, *args, input=None):
    return runner.invoke(main, ["run", *map(str, args)], input=input)


MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello! How are you?"},
            {"role": "assistant", "content": "Fine, thank you."}, {"role": "user", "content": "Tell me a story 🙂"}]


def test_chat_template_matches_transformers(tiny):
    from transformers import AutoTokenizer

    ours, theirs = Tokenizer(tiny), AutoTokenizer.from_pretrained(tiny)
    for messages in (MESSAGES[1:2], MESSAGES):
        for generation_prompt in (True, False):
            expected = theirs.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
            expected = expected["input_ids"] if hasattr(expected, "keys") else expected
            assert ours.chat_ids(messages, generation_prompt) == list(expected)
    assert ours.encode("Hello world") == theirs.encode("Hello world", add_special_tokens=False)


def test_templates_run_sandboxed(tiny, tmp_path):
    shutil.copytree(tiny, tmp_path / "m")
    template = tmp_path / "m" / "chat_template.jinja"  # takes precedence over tokenizer_config.json
    template.write_text("{% for m in messages %}{{ m.content | tojson }}{% if not loop.last %},{% endif %}"
                        "{% endfor %}{% if messages | length > 2 %}{{ raise_exception('too many') }}{% endif %}")
    tokenizer = Tokenizer(tmp_path / "m")
    assert tokenizer.render([{"role": "user", "content": 'é"'}, {"role": "user", "content": "b"}]) == '"é\\"","b"'
    with pytest.raises(TokenizerError, match="too many"):
        tokenizer.render([{"role": "user", "content": "x"}] * 3)
    template.write_text("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(TokenizerError, match="chat template failed"):
        Tokenizer(tmp_path / "m").render([{"role": "user", "content": "x"}])


def test_streamed_text_equals_decoded_text(tiny):
    tokenizer = Tokenizer(tiny)
    text = "héllo wörld, 你好 🙂 and some ascii"
    ids = tokenizer.encode(text)
    detokenize = Detokenizer(tokenizer)
    pieces = [detokenize(i) for i in ids]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in piece for piece in pieces)  # no half characters shown


def test_thinking_blocks_are_split_across_pieces():
    split = ThinkingFilter()
    pieces = []
    for chunk in ["Hi <th", "ink>plan", " it</thi", "nk>Answer <", "b>"]:
        pieces += split(chunk)
    pieces += split.flush()
    thinking = "".join(text for flag, text in pieces if flag)
    answer = "".join(text for flag, text in pieces if not flag)
    assert thinking == "plan it" and answer == "Hi Answer <b>"


def test_a_chat_reuses_its_caches_and_matches_a_fresh_run(tiny):
    engine = offload.load(tiny)
    tokenizer = Tokenizer(tiny)
    # a one-token answer is never fed (only drawn), so the next rendering must start with what was
    # fed, the first prompt: the second turn prefills only its new tokens
    chat = Conversation(engine, tokenizer, max_tokens=1, system="You are terse.")
    list(chat.ask("Hello! How are you?"))
    fed = list(chat.session.held)
    assert fed == engine.history == tokenizer.chat_ids([{"role": "system", "content": "You are terse."},
                                                        {"role": "user", "content": "Hello! How are you?"}])
    list(chat.ask("Tell me more."))
    full_prompt = tokenizer.chat_ids([{"role": "system", "content": "You are terse."}] + chat.messages[:-1])
    assert full_prompt[:len(fed)] == fed and chat.last.prompt_tokens == len(full_prompt) - len(fed)
    assert engine.history[:len(full_prompt)] == full_prompt
    # longer answers: whether or not the history re-renders to the fed tokens, the answer is the
    # one a fresh run on the whole conversation gives
    chat = Conversation(engine, tokenizer, max_tokens=6, system="You are terse.")
    first = "".join(chat.ask("Hello! How are you?"))
    assert chat.messages[-1] == {"role": "assistant", "content": first}
    list(chat.ask("Tell me more."))
    full_prompt = tokenizer.chat_ids([{"role": "system", "content": "You are terse."}] + chat.messages[:-1])
    assert chat.last.token_ids == offload.load(tiny).generate(full_prompt, max_new_tokens=6)


def test_a_turn_continues_the_caches_when_the_history_renders_the_same(tiny):
    tokenizer, engine = Tokenizer(tiny), offload.load(tiny)
    chat = Conversation(engine, tokenizer, max_tokens=4)
    chat.messages = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Fine."}]
    history = tokenizer.chat_ids(chat.messages, add_generation_prompt=False)
    engine.reset()
    engine.feed(history)  # the caches hold exactly the rendered history
    engine.history = list(history)  # what the session holds
    list(chat.ask("And you?"))
    full_prompt = tokenizer.chat_ids(chat.messages[:-1])
    assert full_prompt[:len(history)] == history  # ChatML renders a history the same way every turn
    assert chat.last.prompt_tokens == len(full_prompt) - len(history)  # only the new turn was prefilled
    assert chat.last.token_ids == offload.load(tiny).generate(full_prompt, max_new_tokens=4)


def test_run_streams_text_and_reports(runner, tiny):
    result = run(runner, "--model", tiny, "-p", "Hello! How are you?", "--max-tokens", 8)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()
    tokens = len(Tokenizer(tiny).chat_ids([{"role": "user", "content": "Hello! How are you?"}]))
    assert f"prompt {tokens} tokens at" in result.stderr and "generated" in result.stderr and "RAM" in result.stderr


def test_run_json_stdin_file_and_raw(runner, tiny, tmp_path):
    prompt = "Tell me a story about a small robot"
    record = json.loads(run(runner, "--model", tiny, "-p", prompt, "--max-tokens", 6, "--json").stdout)
    tokenizer = Tokenizer(tiny)
    assert record["prompt_tokens"] == len(tokenizer.chat_ids([{"role": "user", "content": prompt}]))
    shown = [t for t in record["token_ids"] if t not in (0, 2)]  # <|endoftext|>, <|im_end|>: stop ids
    assert record["text"] == tokenizer.decode(shown)
    assert set(record["timings"]) >= {"prefill_tok_s", "decode_tok_s", "load_s"}
    from_stdin = json.loads(run(runner, "--model", tiny, "--max-tokens", 6, "--json", input=prompt).stdout)
    (tmp_path / "prompt.txt").write_text(prompt)
    from_file = json.loads(run(runner, "--model", tiny, "-f", tmp_path / "prompt.txt", "--max-tokens", 6,
                               "--json").stdout)
    assert from_stdin["token_ids"] == from_file["token_ids"] == record["token_ids"]
    raw = json.loads(run(runner, "--model", tiny, "-p", prompt, "--raw", "--max-tokens", 6, "--json").stdout)
    assert raw["prompt_tokens"] == len(tokenizer.encode(prompt))


def test_run_sampling_flags_and_seed(runner, tiny):
    args = ["--model", tiny, "-p", "Hello", "--max-tokens", 12, "--json", "--temperature", 1.5, "--top-k", 50,
            "--top-p", 0.95, "--min-p", 0.01, "--repeat-penalty", 1.1]
    first = json.loads(run(runner, *args, "--seed", 5).stdout)
    assert json.loads(run(runner, *args, "--seed", 5).stdout)["token_ids"] == first["token_ids"]
    assert first["sampling"]["top_k"] == 50 and first["sampling"]["seed"] == 5
    others = {tuple(json.loads(run(runner, *args, "--seed", s).stdout)["token_ids"]) for s in (6, 7, 8)}
    assert others != {tuple(first["token_ids"])}


def _broken(tiny, tmp_path, what):
    path = tmp_path / what
    shutil.copytree(tiny, path)
    if what == "no-tokenizer":
        (path / "tokenizer.json").unlink()
    elif what == "truncated":
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[:len(data) // 2])
    elif what == "corrupt":
        (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" + b"\0" * 64)
    elif what == "llama":
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(config | {"model_type": "llama"}))
    elif what == "not-a-model":
        shutil.rmtree(path)
        path.mkdir()
        (path / "notes.txt").write_text("hello")
    return path


@pytest.mark.parametrize("what, extra, message", [
    ("missing", [], "does not exist"),
    ("not-a-model", [], "config.json"),
    ("llama", [], "llama"),
    ("truncated", [], "model.safetensors"),
    ("corrupt", [], "model.safetensors"),
    ("no-tokenizer", [], "no tokenizer.json"),
    ("ok", ["--gpu-mem", "8 bananas"], "gpu"),
    ("ok", ["--profile", "no-such-profile"], "no-such-profile"),
    ("ok", ["--ctx", "8"], "too long for the context of 8"),
])
def test_first_try_errors_are_one_clear_line(runner, tiny, tmp_path, what, extra, message):
    path = tmp_path / "missing" if what == "missing" else tiny if what == "ok" else _broken(tiny, tmp_path, what)
    result = run(runner, "--model", path, "-p", "Tell me a story about a small robot", "--quant", "none", *extra)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and (message in lines[0].lower() or message in lines[0]), result.stderr
    assert "Traceback" not in result.output


def test_bench_measures_beside_the_plan(runner, tiny):
    result = runner.invoke(main, ["bench", "--model", str(tiny), "--prompt-lengths", "8,40", "--decode-tokens", "4",
                                  "--profile", "cpu-only-2core"])
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["8", "40"]
    assert all(len(row) == 6 and all(float(x) > 0 for x in row[1:5]) for row in rows)
    footer = next(line for line in result.stdout.splitlines() if line.startswith("bound: every byte a decoded token"))
    limit = float(footer.rsplit(",", 1)[1].split()[0])  # tok/s
    for row in rows:  # decode as a share of that bound (a tiny model's bound is huge: the share rounds to 0%)
        assert row[5].endswith("%") and abs(float(row[5][:-1]) / 100 - float(row[3]) / limit) <= 0.006
    assert "planned with profile cpu-only-2core" in result.stdout
    bad = runner.invoke(main, ["bench", "--model", str(tiny), "--prompt-lengths", "8,x"])
    assert bad.exit_code == 2 and "not a list of lengths" in bad.stderr


def test_a_template_that_opens_thinking_starts_the_answer_inside_it(tiny, tmp_path):
    shutil.copytree(tiny, tmp_path / "thinking")
    config = json.loads((tmp_path / "thinking" / "tokenizer_config.json").read_text())
    config["chat_template"] += "{%- if add_generation_prompt %}{{- '<think>\\n' }}{%- endif %}"
    (tmp_path / "thinking" / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer(tmp_path / "thinking")
    assert tokenizer.opens_thinking(tokenizer.chat_ids(MESSAGES[1:2]))
    assert not Tokenizer(tiny).opens_thinking(Tokenizer(tiny).chat_ids(MESSAGES[1:2]))
    split = ThinkingFilter(thinking=True)
    assert split("weighing it</think>The answer") == [(True, "weighing it"), (False, "The answer")]


QWEN_STYLE_TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}{% if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{% endif %}
{{- '# Tools\\n<tools>' }}{% for tool in tools %}{{- '\\n' + tool | tojson }}{% endfor %}{{- '\\n</tools><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_user=messages | length - 1) %}
{%- for message in messages[::-1] %}
{%- if message.role == 'user' and ns.last_user == messages | length - 1 %}{% set ns.last_user = messages | length - 1 - loop.index0 %}{% endif %}
{%- endfor %}
{%- for message in messages %}
{%- if message.role == 'system' %}{% continue %}{% endif %}
{%- set content = message.content if message.content is string else '' %}
{%- if message.role == 'assistant' and '</think>' in content %}
{%- set content = content.split('</think>')[-1].lstrip('\\n') %}
{%- endif %}
{{- '<|im_start|>' + message.role + '\\n' + content }}
{%- if message.tool_calls %}{% for call in message.tool_calls %}
{{- '\\n<tool_call>' + call.function | tojson + '</tool_call>' }}{% endfor %}{% endif %}
{{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}{% if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{% endif %}
{%- endif %}
"""


def test_a_qwen_style_template_matches_transformers(tiny, tmp_path):
    """Namespaces, reversed loops, continue, string tests and methods, tojson, tools and extra
    variables render as transformers renders them."""
    from transformers import AutoTokenizer

    shutil.copytree(tiny, tmp_path / "qwen")
    (tmp_path / "qwen" / "chat_template.jinja").write_text(QWEN_STYLE_TEMPLATE)
    ours, theirs = Tokenizer(tmp_path / "qwen"), AutoTokenizer.from_pretrained(tmp_path / "qwen")
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"city": "string, e.g. Zürich"}}}]
    messages = MESSAGES + [{"role": "assistant", "content": "<think>\nhm</think>\n\nOnce upon a time",
                            "tool_calls": [{"function": {"name": "weather", "arguments": {"city": "Zürich"}}}]},
                           {"role": "user", "content": "And then?"}]
    for variables in ({}, {"enable_thinking": False}, {"tools": tools}):
        expected = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **variables)
        assert ours.render(messages, True, **variables) == expected
        assert ours.chat_ids(messages, True, **variables) == theirs.encode(expected, add_special_tokens=False)


def test_a_full_context_is_explained_and_the_chat_goes_on(tiny):
    chat = Conversation(offload.load(tiny, ctx=64), Tokenizer(tiny), max_tokens=1000)
    first = "".join(chat.ask("Hi"))
    # the answer ran until a stop token or the end of the context, never past it
    assert chat.last.generated_tokens >= 1 and len(chat.messages) == 2
    assert chat.engine.position + 1 == 64 or chat.last.finish_reason == "stop"
    with pytest.raises(offload.OffloadError, match="context holds 64; /reset"):
        list(chat.ask("Tell me a long story about a small robot who learns to read, one page at a time."))
    assert len(chat.messages) == 2  # the failed turn left no trace
    chat.reset()
    assert "".join(chat.ask("Hi")) == first
