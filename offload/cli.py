"""The `offload` command line."""

from __future__ import annotations

import functools
import sys
import textwrap
import time
from pathlib import Path

import click

DEMO_PRESET = "demo-qwen3-next"


class OffloadGroup(click.Group):
    """Turns OffloadError into one line on stderr and exit code 1, Ctrl-C into exit code 130
    (a traceback with --debug)."""

    def invoke(self, ctx: click.Context):
        from offload.errors import OffloadError, interrupted

        try:
            return super().invoke(ctx)
        except OffloadError as e:
            if ctx.params.get("debug"):
                raise
            click.echo(f"error: {' '.join(str(e).split())}", err=True)  # one line, whatever a file put in it
            ctx.exit(1)
        except (KeyboardInterrupt, SystemError) as error:
            if ctx.params.get("debug") or not interrupted(error):
                raise
            click.echo("\ninterrupted", err=True)  # files are written to temporary names: nothing half-done stays
            ctx.exit(130)


@click.group(cls=OffloadGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.version_option(package_name="offload")
def main(debug: bool) -> None:
    """Run huge sparse Mixture-of-Experts models on a small GPU and a lot of RAM."""


def _demo_model() -> Path:
    """The cached demo checkpoint, built on first use."""
    from offload.paths import cache_root
    from offload.synthetic import checkpoint_nbytes, preset_config, synthesize, tokenizer_current, write_tokenizer

    path = cache_root() / DEMO_PRESET
    if (path / "config.json").is_file():
        if not tokenizer_current(path):  # cached by an older version
            write_tokenizer(path, preset_config(DEMO_PRESET)["vocab_size"])
        return path
    config = preset_config(DEMO_PRESET)
    click.echo(f"Building the demo model (random weights, {checkpoint_nbytes(config) / 2**20:.0f} MiB) "
               f"in {path}, once ...", err=True)
    synthesize(path, config, overwrite=True)
    return path


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(tok) for tok in text.replace(",", " ").split()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a list of token ids; write e.g. '1 2 3'") from None
    if any(i < 0 for i in ids):
        raise click.BadParameter(f"token ids are 0 or more, got {min(ids)}")
    return ids


def model_options(command):
    """Which model and how to place it: shared by run, chat, serve and bench."""
    options = [
        click.option("--model", "model_dir", type=click.Path(path_type=Path), help="Checkpoint directory."),
        click.option("--demo", is_flag=True, help="Use the built-in demo model (random weights, meaningless text)."),
        click.option("--ctx", default=None, type=click.IntRange(min=1), help="Context length to allocate [4096]."),
        click.option("--quant", type=click.Choice(["int4", "none"]), default="int4", show_default=True,
                     help="Routed experts as int4 (built once into the expert store) or as stored."),
        click.option("--dense-quant", type=click.Choice(["auto", "int8", "int4", "none"]), default="auto",
                     show_default=True, help="Dense matrices on the CPU as int8 or int4, or as stored; auto: "
                                             "int4 and lm_head int6 when the experts are int4 (bytes per "
                                             "token as llama.cpp's Q4_K_M)."),
        click.option("--exact", is_flag=True,
                     help="Keep the routed experts' activations in fp32 (slower; reproduces transformers on the "
                          "int4 weights) instead of int8 with integer dot products."),
        click.option("--gpu-mem", default=None,
                     help="GPU memory budget, e.g. 8G; 0 runs everything on the CPU [the profile's GPU memory]."),
        click.option("--device", default=None,
                     help="Where the GPU's share runs: cuda, cuda:N, or cpu (a stand-in, with --gpu-mem) "
                          "[cuda when torch sees one]."),
        click.option("--profile", default=None, help="Hardware profile: a name in profiles/ or a YAML file."),
        click.option("--rope-scaling", default=None,
                     help="Extend the context with YaRN: yarn:FACTOR or yarn:FACTOR:ORIGINAL_CONTEXT (e.g. yarn:4 "
                          "for 4x the model's positions), or none [config.json's]."),
        click.option("--kv-cache", type=click.Choice(["auto", "f32", "bf16", "f16", "int8"]), default="auto",
                     show_default=True,
                     help="How keys and values are stored; auto: int8 on the CPU, bf16 on a GPU (int8 if the plan "
                          "needs the room), as computed with --quant none or --exact."),
        click.option("--cuda-graphs", is_flag=True,
                     help="Replay each decode step's GPU work from captured CUDA graphs (fewer launches; "
                          "needs a CUDA device and the KV cache in the compute dtype)."),
    ]

    @functools.wraps(command)
    def gathered(**flags):  # the command sees them as one dict, `load_options`, passed on to _load
        flags["load_options"] = {name: flags.pop(name) for name in LOAD_FLAGS}
        return command(**flags)

    for option in reversed(options):
        gathered = option(gathered)
    return gathered


LOAD_FLAGS = ("quant", "dense_quant", "exact", "gpu_mem", "device", "profile", "rope_scaling", "kv_cache",
              "cuda_graphs")


def sampling_options(command):
    options = [
        click.option("--max-tokens", default=None, type=click.IntRange(min=1), help="Tokens to generate at most [256; chat 1024]."),
        click.option("--temperature", default=None, type=click.FloatRange(min=0.0),
                     help="Sampling temperature; 0 is greedy [generation_config.json, else 0]."),
        click.option("--top-k", default=None, type=click.IntRange(min=0), help="Keep the k most likely tokens (0: all)."),
        click.option("--top-p", default=None, type=click.FloatRange(0.0, 1.0, min_open=True), help="Nucleus sampling mass."),
        click.option("--min-p", default=None, type=click.FloatRange(0.0, 1.0), help="Drop tokens below min-p x the top one."),
        click.option("--repeat-penalty", "repetition_penalty", default=None, type=click.FloatRange(min=0.0, min_open=True),
                     help="Penalise tokens already in the sequence (1: off)."),
        click.option("--seed", default=None, type=int, help="Random seed: the same seed repeats a run."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _model_dir(model_dir: Path | None, demo: bool) -> Path:
    from offload.config import load_config
    from offload.errors import OffloadError

    if demo == (model_dir is not None):
        raise click.UsageError("give exactly one of --model DIR or --demo")
    if demo:
        return _demo_model()
    if not model_dir.exists():
        raise OffloadError(f"{model_dir} does not exist; give the folder of a Hugging Face checkpoint "
                           "(config.json, *.safetensors, tokenizer.json)")
    load_config(model_dir)  # not a model, or an unsupported one: say so before anything else
    return model_dir


def _load(model_dir: Path, ctx, load_options: dict):
    """(engine, load seconds), with a one-line progress note on stderr. `load_options`: the
    model_options flags (LOAD_FLAGS)."""
    import offload

    click.echo(f"loading {model_dir} ...", err=True)
    started = time.perf_counter()
    options = {name: None if value == "none" and name in ("quant", "dense_quant") else value
               for name, value in load_options.items()}
    engine = offload.load(model_dir, ctx=ctx, **options)
    return engine, time.perf_counter() - started


def _sampling(model_dir: Path, **flags):
    from offload.sampling import generation_defaults

    chosen = {name: value for name, value in flags.items() if value is not None}
    return generation_defaults(model_dir).with_(**chosen)


def _execution_words(engine) -> str:
    from offload.placement import torch_device_name

    if not engine.plan.gpu_budget:
        return "execution on the CPU"
    if engine.device.type != "cuda":
        return "the GPU's share on the CPU (stand-in), routed experts on the CPU"
    return f"the GPU's share on {torch_device_name(engine.device)}, routed experts on the CPU"


def _memory_line(engine) -> str:
    import psutil

    from offload.hardware import format_size

    ram = f"RAM {format_size(psutil.Process().memory_info().rss)}"
    if not engine.plan.gpu_budget:
        return f"{ram}, GPU 0 B (CPU execution)"
    if engine.device.type != "cuda":
        return f"{ram} (the GPU plan runs on the CPU, standing in for a GPU)"
    from offload.placement import torch_device_name

    return (f"{ram}, GPU peak {format_size(engine.gpu_peak_bytes)} of {format_size(engine.plan.gpu_bytes)} "
            f"planned ({torch_device_name(engine.device)})")


@main.command()
@model_options
@click.option("--prompt", "-p", "prompt_text", default=None, help="The prompt text.")
@click.option("--file", "-f", "prompt_file", type=click.File("rb"), default=None,
              help="Read the prompt from a file ('-' for stdin).")
@click.option("--ids", "ids_text", default=None, help="The prompt as token ids, e.g. '1 2 3' (no tokenizer needed).")
@click.option("--system", default=None, help="A system message (chat mode).")
@click.option("--chat/--raw", "chat_mode", default=None,
              help="Apply the model's chat template to the prompt, or send it as it is [chat if the model has a template].")
@sampling_options
@click.option("--hide-thinking", is_flag=True, help="Do not show <think> ... </think> blocks.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (text, token ids, timings) instead.")
@click.option("--verbose", "-v", is_flag=True, help="Show where each tensor group runs, once loaded.")
def run(model_dir, demo, ctx, load_options, prompt_text, prompt_file, ids_text, system, chat_mode, hide_thinking,
        as_json, verbose, **sampling_flags) -> None:
    """Generate text from one prompt, streamed.

    The prompt comes from --prompt, --file, --ids or stdin; a stats line follows on stderr."""
    import dataclasses
    import json

    from offload.config import DEFAULT_CONTEXT, check_context, load_config
    from offload.conversation import Stats, generate, text_pieces
    from offload.errors import OffloadError
    from offload.repl import PrefillBar, show
    from offload.tokenizer import ThinkingFilter, Tokenizer, decode_input

    given = [x is not None for x in (prompt_text, prompt_file, ids_text)]
    if sum(given) > 1:
        raise click.UsageError("give one prompt: --prompt, --file or --ids")
    if not any(given):
        if sys.stdin.isatty():
            raise click.UsageError("give a prompt with --prompt TEXT, --file FILE, --ids '1 2 3' or on stdin")
        prompt_text = decode_input(sys.stdin.buffer.read(), "the prompt on stdin")
    elif prompt_file is not None:
        prompt_text = decode_input(prompt_file.read(), f"the prompt in {getattr(prompt_file, 'name', '-')}")
    max_tokens = sampling_flags.pop("max_tokens") or 256
    model_dir = _model_dir(model_dir, demo)
    tokenizer = Tokenizer(model_dir) if ids_text is None or (model_dir / "tokenizer.json").is_file() else None
    sampling = _sampling(model_dir, **sampling_flags)
    if ids_text is not None:
        prompt_ids = _parse_ids(ids_text)
    else:
        if chat_mode is None:
            chat_mode = tokenizer.chat_template is not None
        if chat_mode:
            messages = ([{"role": "system", "content": system}] if system else []) + \
                [{"role": "user", "content": prompt_text}]
            prompt_ids = tokenizer.chat_ids(messages)
        else:
            prompt_ids = tokenizer.encode(prompt_text)
    if not prompt_ids:
        raise OffloadError("the prompt is empty; give some text")
    args = load_config(model_dir, load_options["rope_scaling"])
    if prompt_ids and max(prompt_ids) >= args.vocab_size:
        raise click.BadParameter(f"token ids are below the vocabulary size {args.vocab_size}, got {max(prompt_ids)}",
                                 param_hint="'--ids'")
    ctx = ctx or min(DEFAULT_CONTEXT, args.max_context)  # as offload.load chooses and checks it
    check_context(args, ctx)
    if len(prompt_ids) >= ctx:  # said before loading, which can take minutes
        raise OffloadError(f"the prompt is {len(prompt_ids)} tokens, too long for the context of {ctx} (the "
                           "answer needs room too); pass a larger --ctx or a shorter prompt")
    max_tokens = min(max_tokens, ctx - len(prompt_ids))
    engine, load_s = _load(model_dir, ctx, load_options)
    click.echo(f"loaded in {load_s:.1f} s ({engine.args.model_type}, {engine.args.num_hidden_layers} layers)",
               err=True)
    if verbose:
        from offload.placement import describe

        click.echo("\n".join(describe(engine.placement)), err=True)

    stats = Stats()
    tokens = generate(engine, prompt_ids, sampling, max_tokens, stats, progress=PrefillBar())
    if as_json:
        generated = list(tokens)
        shown = [t for t in generated if t not in engine.stop_ids]
        result = {"model": str(model_dir), "text": tokenizer.decode(shown) if tokenizer else None,
                  "token_ids": generated, "prompt_tokens": len(prompt_ids), "generated_tokens": len(generated),
                  "finish_reason": stats.finish_reason,
                  "timings": {"load_s": round(load_s, 3), "prefill_s": round(stats.prefill_s, 4),
                              "prefill_tok_s": round(stats.prefill_rate, 2), "decode_s": round(stats.decode_s, 4),
                              "decode_tok_s": round(stats.decode_rate, 2)},
                  "sampling": dataclasses.asdict(sampling)}
        click.echo(json.dumps(result, indent=2))
        return
    if tokenizer is None:
        for token in tokens:
            click.echo(f"{token} ", nl=False)
            sys.stdout.flush()
    else:
        terminal = sys.stdout.isatty()
        split = ThinkingFilter(tokenizer.opens_thinking(prompt_ids))
        for piece in text_pieces(tokenizer, tokens, engine.stop_ids):
            show(split(piece), hide_thinking, terminal)
        show(split.flush(), hide_thinking, terminal)
    click.echo()
    click.echo(f"{stats.line()}; {_memory_line(engine)}", err=True)


@main.command()
@model_options
@sampling_options
@click.option("--system", default=None, help="A system message for the conversation.")
@click.option("--hide-thinking", is_flag=True, help="Do not show <think> ... </think> blocks.")
def chat(model_dir, demo, ctx, load_options, system, hide_thinking, **sampling_flags) -> None:
    """Chat with a model, interactively or piped.

    On a terminal: line editing, history, /help for commands, Ctrl-C stops an answer, Ctrl-D
    leaves. Piped in: one message per line."""
    from offload.conversation import Conversation
    from offload.repl import Repl
    from offload.tokenizer import Tokenizer

    max_tokens = sampling_flags.pop("max_tokens") or 1024
    model_dir = _model_dir(model_dir, demo)
    tokenizer = Tokenizer(model_dir)
    tokenizer.render([{"role": "user", "content": "hi"}])  # fails now, not after the first message, if no template
    sampling = _sampling(model_dir, **sampling_flags)
    engine, load_s = _load(model_dir, ctx, load_options)
    conversation = Conversation(engine, tokenizer, sampling, max_tokens, system)
    click.echo(f"loaded {model_dir.name} in {load_s:.1f} s", err=True)
    Repl(conversation, hide_thinking=hide_thinking, memory=lambda: _memory_line(engine)).run()


@main.command()
@model_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="TCP port (0: any free one).")
@click.option("--api-key", default=None, envvar="OFFLOAD_API_KEY",
              help="Require 'Authorization: Bearer KEY' on every /v1 request [$OFFLOAD_API_KEY].")
@click.option("--parallel", default=None, type=click.IntRange(min=1),
              help="Requests answered at once, each in a slot with its own caches for --ctx positions; their "
                   "decode steps run as one batch [4 where the plan fits them, else 2 or 1].")
@click.option("--max-queue", default=16, show_default=True, type=click.IntRange(min=0),
              help="Requests that may wait while every slot is busy; more are answered 429.")
@click.option("--snapshots", default=4, show_default=True, type=click.IntRange(min=0),
              help="Sequence snapshots kept in RAM per slot for prefix reuse (an edited or regenerated last "
                   "turn).")
@click.option("--tool-call-format", type=click.Choice(["json", "xml"]), default=None,
              help="How the model writes a tool call: json (Qwen3, Qwen3-Next) or xml (Qwen3-Coder, Qwen3.5) "
                   "[default: as its chat template renders calls].")
def serve(model_dir, demo, ctx, load_options, host, port, api_key, parallel, max_queue,
          snapshots, tool_call_format) -> None:
    """Serve the OpenAI API (chat and text completions) until Ctrl-C or SIGTERM.

    Point a client at it with OPENAI_BASE_URL=http://HOST:PORT/v1."""
    import signal
    import socket

    try:
        from offload.server import Http, Service
    except ImportError as error:
        from offload.errors import OffloadError

        raise OffloadError(f"offload serve needs the server libraries ({error.name} is missing): "
                           "pip install 'offload[serve]'") from None
    from offload.errors import OffloadError
    from offload.placement import describe
    from offload.sampling import generation_defaults
    from offload.tokenizer import Tokenizer

    model_dir = _model_dir(model_dir, demo)
    tokenizer = Tokenizer(model_dir)
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:  # before loading: a busy port is said at once
        listener.bind((host, port))
    except OSError as error:
        raise OffloadError(f"cannot listen on {host}:{port} ({error.strerror}); choose another --port or --host") from None
    engine, load_s = _load(model_dir, ctx, {**load_options, "slots": parallel or "auto"})
    click.echo(f"loaded {model_dir.name} in {load_s:.1f} s; {_execution_words(engine)}", err=True)
    click.echo("\n".join(describe(engine.placement)), err=True)
    service = Service(engine, tokenizer, "demo" if demo else model_dir.name, generation_defaults(model_dir),
                      max_queue=max_queue, snapshots=snapshots, api_key=api_key, tool_format=tool_call_format)
    http = Http(service, listener, host, port)
    click.echo(f"serving {service.model_name} at {http.url} ({len(engine.slots)} at once, context {engine.ctx} "
               "tokens each); Ctrl-C stops", err=True)

    def interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # `kill`, a service manager's stop: as Ctrl-C
    try:
        service.work()
    except KeyboardInterrupt:  # a requested stop
        pass
    finally:
        http.stop()
    click.echo("stopped", err=True)


@main.command()
@model_options
@click.option("--prompt-lengths", default="128,512,2048", show_default=True,
              help="Prompt lengths to measure, comma-separated.")
@click.option("--decode-tokens", default=32, show_default=True, type=click.IntRange(min=2),
              help="Tokens generated after each prompt.")
def bench(model_dir, demo, ctx, load_options, prompt_lengths, decode_tokens) -> None:
    """Measure prefill and decode speed vs the plan.

    For each prompt length: prefill tok/s and the median decode step, beside the planner's
    prediction for this machine's profile, and decode as a share of its bound (every byte a token
    reads at the profile's memory bandwidth)."""
    import statistics

    import numpy as np

    from offload.planner import make_plan

    try:
        lengths = sorted({int(n) for n in prompt_lengths.split(",")})
    except ValueError:
        raise click.BadParameter(f"{prompt_lengths!r} is not a list of lengths; write e.g. 128,512") from None
    if not lengths or lengths[0] < 1:
        raise click.BadParameter("prompt lengths must be positive")
    model_dir = _model_dir(model_dir, demo)
    profile = load_options["profile"]
    hardware, source = _resolve_profile(profile)
    needed = lengths[-1] + decode_tokens
    engine, load_s = _load(model_dir, ctx or max(needed, 512), load_options)
    if needed > engine.ctx:
        raise click.BadParameter(f"the longest prompt plus {decode_tokens} tokens needs --ctx {needed}")
    click.echo(f"{model_dir.name}: {engine.args.model_type}, {engine.args.num_hidden_layers} layers, "
               f"loaded in {load_s:.1f} s; {_execution_words(engine)}, planned with profile {hardware.name}")
    if source != profile:
        click.echo(f"  ({source})")
    rng = np.random.default_rng(0)
    engine.feed(rng.integers(1, engine.args.vocab_size, 16), all_logits=False)  # compile / warm up
    click.echo(f"{'prompt':>8} {'prefill tok/s':>14} {'(plan)':>8} {'decode tok/s':>14} {'(plan)':>8} {'of bound':>9}")
    for length in lengths:
        engine.reset()
        prompt = rng.integers(1, engine.args.vocab_size, length)
        started = time.perf_counter()
        engine.feed(prompt, all_logits=False)
        prefill = length / (time.perf_counter() - started)
        steps = []
        for token in rng.integers(1, engine.args.vocab_size, decode_tokens):
            started = time.perf_counter()
            engine.feed([int(token)], all_logits=False)
            steps.append(time.perf_counter() - started)
        decode = 1 / statistics.median(steps)
        predicted = make_plan(engine.args, hardware, engine.plan.gpu_budget, ctx=engine.ctx, quant=engine.plan.quant,
                              dense_quant=engine.plan.dense_quant, prompt_tokens=length,
                              kv_cache=engine.plan.kv_format).predicted
        click.echo(f"{length:>8} {prefill:>14.1f} {predicted.prefill_tok_s:>8.1f} {decode:>14.1f} "
                   f"{predicted.decode_tok_s:>8.1f} {decode / predicted.decode_limit_tok_s:>9.0%}")
    click.echo(f"bound: every byte a decoded token reads at the profile's memory bandwidth, "
               f"{predicted.decode_limit_tok_s:.1f} tok/s")


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Store directory (default: a folder under ~/.cache/offload/stores).")
@click.option("--verify", is_flag=True, help="Check an existing store against the checksums written when it was "
                                             "built (finds silent damage); exit 1 if it is not whole.")
def quantize(model_dir: Path, out: Path | None, verify: bool) -> None:
    """Build the int4 expert store of MODEL_DIR.

    Resumes an interrupted build and rebuilds damaged (truncated, resized) layer files; an
    up-to-date store is left as it is."""
    from tqdm import tqdm

    from offload.config import load_config
    from offload.errors import OffloadError
    from offload.store import build_store, default_store_dir, store_is_current, verify_store

    args = load_config(model_dir)
    out = out or default_store_dir(model_dir)
    if verify:
        with tqdm(total=1, unit=" layers", desc="verifying") as bar:
            def advance(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)
            problems = verify_store(out, model_dir, args, advance)
        for problem in problems[1:]:
            click.echo(f"error: {problem}", err=True)
        if problems:
            raise OffloadError(problems[0])
        click.echo(f"{out}: every layer matches its checksums")
        return
    if store_is_current(out, model_dir, args):
        click.echo(f"{out} is up to date")
        return
    with tqdm(total=1, unit="B", unit_scale=True, unit_divisor=1024, desc="quantising experts") as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)
        build_store(model_dir, args, out, progress)
    click.echo(f"wrote {out}")


@main.command()
@click.argument("preset")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--layers", type=int, default=None, help="Number of layers (default: the preset's).")
@click.option("--experts", type=int, default=None, help="Routed experts per layer (default: the preset's).")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32", "fp8"]), default=None,
              help="Weight dtype (default: the preset's); fp8: the projections block-scaled e4m3 as the "
                   "official FP8 releases store them, the rest bf16.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--shard-mib", default=2048, show_default=True, type=click.IntRange(min=1),
              help="Largest shard file, in MiB.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def synth(preset: str, out: Path, layers: int | None, experts: int | None, dtype: str | None, seed: int,
          shard_mib: int, force: bool) -> None:
    """Write a random checkpoint of PRESET's architecture to OUT.

    Presets: qwen3-next-80b-a3b, qwen3-30b-a3b, qwen3-235b-a22b, qwen3.5-35b-a3b, qwen3.5-122b-a10b,
    qwen3.5-397b-a17b, tiny-qwen3-next, tiny-qwen3-moe, tiny-qwen3.5-moe, demo-qwen3-next.
    """
    from tqdm import tqdm

    from offload.config import args_from_dict
    from offload.synthetic import checkpoint_nbytes, preset_config, synthesize

    config = preset_config(preset, layers=layers, experts=experts, dtype=dtype)
    args = args_from_dict(config)
    total = checkpoint_nbytes(config)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="writing",
              disable=total < 64 * 2**20) as bar:
        synthesize(out, config, seed=seed, max_shard_bytes=shard_mib * 2**20, overwrite=force,
                   progress=bar.update)
    click.echo(f"wrote {out} ({preset}, {args.num_hidden_layers} layers, {args.num_experts} experts, "
               f"{total / 2**30:.2f} GiB)")


def _render_plan(result, profile_source: str) -> str:
    from offload.hardware import format_size

    gib = 2**30
    lines = [f"{result.model}: {result.params_total / 1e9:.1f}B parameters, "
             f"{result.params_active / 1e9:.2f}B active per token",
             f"profile {profile_source}",
             f"GPU budget {format_size(result.gpu_budget) if result.gpu_budget else 'none (CPU only)'}, "
             f"context {result.ctx} tokens, routed experts {result.quant}", "",
             f"  {'tensor group':<36} {'device':<6} {'format':<6} {'size':>10}"]
    for item in result.placement:
        lines.append(f"  {item.group:<36} {item.device.upper() if item.device == 'gpu' else 'RAM':<6} "
                     f"{item.format:<6} {item.nbytes / gib:7.2f} GiB")
    lines.append("")
    if result.gpu_budget:
        lines.append(f"  GPU {result.gpu_bytes / gib:6.1f} GiB of {result.gpu_budget / gib:.1f} GiB "
                     f"(smallest budget that works: {result.minimum_gpu_bytes / gib:.1f} GiB)")
    lines.append(f"  RAM {result.ram_bytes / gib:6.1f} GiB of {result.ram_available / gib:.1f} GiB "
                 "(incl. 2 GiB for the runtime)")
    p = result.predicted
    lines += ["", f"  decode   {p.decode_tok_s:8.1f} tok/s   bound: {p.decode_bound}",
              f"           {p.decode_tok_s_at_ctx:8.1f} tok/s   at depth {result.ctx}; bound: {p.decode_bound_at_ctx}",
              f"  prefill  {p.prefill_tok_s:8.1f} tok/s   for {p.prefill_tokens} tokens, experts "
              f"{'streamed to the GPU' if p.prefill_strategy == 'stream' else 'on the CPU'}; bound: {p.prefill_bound}"]
    if p.stream_from_tokens:
        lines.append(f"           streaming experts to the GPU is faster from {p.stream_from_tokens} prompt tokens")
    for note in result.notes:
        lines += textwrap.wrap(note, width=100, initial_indent="  note: ", subsequent_indent="        ")
    lines += ["", "fits" if result.fits else f"does not fit: {result.reason}"]
    return "\n".join(lines)


def _resolve_profile(profile: str | None):
    from offload.hardware import default_profile, load_profile

    if profile:
        return load_profile(profile), profile
    return default_profile()


@main.command()
@click.option("--model", "model_dir", type=click.Path(path_type=Path), help="Checkpoint directory (reads config.json).")
@click.option("--preset", default=None, help="A known model instead: qwen3-next-80b-a3b, qwen3-30b-a3b, qwen3-235b-a22b, "
                   "qwen3.5-35b-a3b, qwen3.5-122b-a10b, qwen3.5-397b-a17b.")
@click.option("--gpu-mem", default=None, help="GPU memory budget, e.g. 8G; 0 runs on the CPU (default: the GPU's memory).")
@click.option("--ctx", default=4096, show_default=True, type=click.IntRange(min=1), help="Context length to hold.")
@click.option("--profile", default=None, help="Hardware profile: a name in profiles/ or a YAML file.")
@click.option("--prompt", "prompt_tokens", default=2048, show_default=True, type=click.IntRange(min=1),
              help="Prompt length for the prefill prediction.")
@click.option("--quant", type=click.Choice(["int4", "none"]), default="int4", show_default=True,
              help="Format of the routed experts.")
@click.option("--dense-quant", type=click.Choice(["auto", "int8", "int4", "none"]), default="auto", show_default=True,
              help="Format of dense matrices in RAM (see run --help).")
@click.option("--rope-scaling", default=None, help="Extend the context with YaRN, e.g. yarn:4 (see run --help).")
@click.option("--kv-cache", type=click.Choice(["auto", "f32", "bf16", "f16", "int8"]), default="auto",
              show_default=True, help="How keys and values are stored (see run --help).")
@click.option("--parallel", default=1, show_default=True, type=click.IntRange(min=1),
              help="Sequences held at once (serve --parallel; serve's default is 4 where they fit), each with "
                   "its caches for --ctx positions.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(model_dir: Path | None, preset: str | None, gpu_mem: str | None, ctx: int, profile: str | None,
         prompt_tokens: int, quant: str, dense_quant: str, rope_scaling: str | None, kv_cache: str,
         parallel: int, as_json: bool) -> None:
    """Show where a model's tensors go, how fast.

    Placement, GPU and RAM ledgers and predicted speeds for a checkpoint or a preset."""
    import json

    from offload.config import args_from_dict, check_context, load_config
    from offload.hardware import parse_size
    from offload.errors import OffloadError
    from offload.planner import make_plan
    from offload.synthetic import preset_config

    if (model_dir is None) == (preset is None):
        raise click.UsageError("give exactly one of --model DIR or --preset NAME")
    args = load_config(model_dir, rope_scaling) if model_dir else args_from_dict(preset_config(preset), rope_scaling)
    check_context(args, ctx)
    hardware, profile_source = _resolve_profile(profile)
    budget = parse_size(gpu_mem, "--gpu-mem") if gpu_mem is not None else None
    if budget and hardware.gpu is None:
        raise OffloadError(f"profile {hardware.name} has no GPU; pass --gpu-mem 0 to plan for the CPU, "
                           "or --profile for a machine with a GPU")
    result = make_plan(args, hardware, budget, ctx=ctx, quant=quant, prompt_tokens=prompt_tokens,
                       model_name=preset or str(model_dir), dense_quant=None if dense_quant == "none" else dense_quant,
                       kv_cache=kv_cache, slots=parallel)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(_render_plan(result, profile_source))
    if not result.fits:
        click.echo(f"error: {result.reason}", err=True)
        raise SystemExit(1)


@main.group()
def profile() -> None:
    """Hardware profiles: measure this machine."""


@profile.command("detect")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Where to write the profile (default: ~/.config/offload/profile.yaml, which "
                   "`offload plan` then uses).")
@click.option("--quick", is_flag=True, help="Small probes: seconds instead of a minute, less accurate.")
def profile_detect(output: Path | None, quick: bool) -> None:
    """Measure this machine and write a hardware profile."""
    from offload.hardware import DEFAULT_PROFILE_PATH, detect, write_profile

    output = output or DEFAULT_PROFILE_PATH
    output.parent.mkdir(parents=True, exist_ok=True)
    measured = detect(progress=lambda line: click.echo(line, err=True), quick=quick)
    write_profile(measured, output, comment=f"Measured by `offload profile detect` on {time.strftime('%Y-%m-%d')}.")
    click.echo(f"wrote {output}")


if __name__ == "__main__":
    main()
