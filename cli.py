"""The `offload` command line."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

DEMO_PRESET = "demo-qwen3-next"


class OffloadGroup(click.Group):
    """Turns OffloadError into one line on stderr and exit code 1, Ctrl-C into exit code 130
    (a traceback with --debug)."""

    def invoke(self, ctx: click.Context):
        from offload.errors import OffloadError

        try:
            return super().invoke(ctx)
        except OffloadError as e:
            if ctx.params.get("debug"):
                raise
            click.echo(f"error: {e}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            if ctx.params.get("debug"):
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
    from offload.synthetic import checkpoint_nbytes, preset_config, synthesize

    path = cache_root() / DEMO_PRESET
    if (path / "config.json").is_file():
        return path
    config = preset_config(DEMO_PRESET)
    click.echo(f"Building the demo model (random weights, {checkpoint_nbytes(config) / 2**20:.0f} MiB) "
               f"in {path} ...", err=True)
    synthesize(path, config, overwrite=True)
    return path


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(tok) for tok in text.replace(",", " ").split()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a list of token ids; write e.g. '1 2 3'") from None


@main.command()
@click.option("--model", "model_dir", type=click.Path(path_type=Path), help="Checkpoint directory.")
@click.option("--demo", is_flag=True, help="Use the built-in demo model (random weights).")
@click.option("--ids", "ids_text", default=None, help="Prompt as token ids, e.g. '1 2 3'.")
@click.option("--max-tokens", default=32, show_default=True, type=click.IntRange(min=1),
              help="Tokens to generate.")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0.0),
              help="Sampling temperature; 0 is greedy.")
@click.option("--seed", default=None, type=int, help="Random seed for sampling.")
@click.option("--ctx", default=None, type=click.IntRange(min=1), help="Context length to allocate.")
@click.option("--quant", type=click.Choice(["int4", "none"]), default="int4", show_default=True,
              help="Routed experts as int4 (built once into the expert store) or in the checkpoint's precision.")
@click.option("--dense-quant", type=click.Choice(["auto", "int8", "int4", "none"]), default="auto", show_default=True,
              help="Dense matrices on the CPU (mixers, shared experts, lm_head) as int8 or int4, or as stored; "
                   "auto: int8 when the experts are int4.")
@click.option("--gpu-mem", default=None, help="GPU memory budget, e.g. 8G (planned; execution is on the CPU for now).")
@click.option("--profile", default=None, help="Hardware profile: a name in profiles/ or a YAML file.")
def run(model_dir: Path | None, demo: bool, ids_text: str | None, max_tokens: int, temperature: float,
        seed: int | None, ctx: int | None, quant: str, dense_quant: str, gpu_mem: str | None,
        profile: str | None) -> None:
    """Generate from a prompt of token ids."""
    import offload

    if demo == (model_dir is not None):
        raise click.UsageError("give exactly one of --model DIR or --demo")
    if demo:
        model_dir = _demo_model()
    started = time.perf_counter()
    engine = offload.load(model_dir, quant=None if quant == "none" else quant, gpu_mem=gpu_mem,
                          profile=profile, ctx=ctx, dense_quant=None if dense_quant == "none" else dense_quant)
    loaded = time.perf_counter()
    prompt = _parse_ids(ids_text) if ids_text else list(range(1, 9))
    click.echo(f"loaded {model_dir} ({engine.args.model_type}, {engine.args.num_hidden_layers} layers) "
               f"in {loaded - started:.1f} s", err=True)
    click.echo(f"prompt: {' '.join(map(str, prompt))}", err=True)
    generated = []
    first_token_at = None
    for token in engine.stream(prompt, max_new_tokens=max_tokens, temperature=temperature, seed=seed):
        if first_token_at is None:
            first_token_at = time.perf_counter()
        generated.append(token)
        click.echo(f"{token} ", nl=False)
        sys.stdout.flush()
    done = time.perf_counter()
    click.echo()
    decode_rate = (len(generated) - 1) / (done - first_token_at) if len(generated) > 1 else float("nan")
    click.echo(f"prompt {len(prompt)} tokens at {len(prompt) / (first_token_at - loaded):.1f} tok/s, "
               f"generated {len(generated)} tokens at {decode_rate:.1f} tok/s", err=True)


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Store directory (default: a folder under ~/.cache/offload/stores).")
def quantize(model_dir: Path, out: Path | None) -> None:
    """Build the int4 expert store of MODEL_DIR (resumes an interrupted build)."""
    from tqdm import tqdm

    from offload.config import load_config
    from offload.store import build_store, default_store_dir, store_is_current

    args = load_config(model_dir)
    out = out or default_store_dir(model_dir)
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
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default=None,
              help="Weight dtype (default: the preset's).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--shard-mib", default=2048, show_default=True, type=click.IntRange(min=1),
              help="Largest shard file, in MiB.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def synth(preset: str, out: Path, layers: int | None, experts: int | None, dtype: str | None, seed: int,
          shard_mib: int, force: bool) -> None:
    """Write a random checkpoint of PRESET's architecture to OUT.

    Presets: qwen3-next-80b-a3b, qwen3-30b-a3b, qwen3-235b-a22b, tiny-qwen3-next, tiny-qwen3-moe,
    demo-qwen3-next.
    """
    from tqdm import tqdm

    from offload.synthetic import checkpoint_nbytes, preset_config, synthesize

    config = preset_config(preset, layers=layers, experts=experts, dtype=dtype)
    total = checkpoint_nbytes(config)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="writing",
              disable=total < 64 * 2**20) as bar:
        synthesize(out, config, seed=seed, max_shard_bytes=shard_mib * 2**20, overwrite=force,
                   progress=bar.update)
    click.echo(f"wrote {out} ({preset}, {config['num_hidden_layers']} layers, "
               f"{config['num_experts']} experts, {total / 2**30:.2f} GiB)")


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
              f"  prefill  {p.prefill_tok_s:8.1f} tok/s   for {p.prefill_tokens} tokens, experts "
              f"{'streamed to the GPU' if p.prefill_strategy == 'stream' else 'on the CPU'}; bound: {p.prefill_bound}"]
    if p.stream_from_tokens:
        lines.append(f"           streaming experts to the GPU is faster from {p.stream_from_tokens} prompt tokens")
    lines += [f"  note: {note}" for note in result.notes]
    lines += ["", "fits" if result.fits else f"does not fit: {result.reason}"]
    return "\n".join(lines)


def _resolve_profile(profile: str | None):
    from offload.hardware import default_profile, load_profile

    if profile:
        return load_profile(profile), profile
    return default_profile()


@main.command()
@click.option("--model", "model_dir", type=click.Path(path_type=Path), help="Checkpoint directory (reads config.json).")
@click.option("--preset", default=None, help="A known model instead: qwen3-next-80b-a3b, qwen3-30b-a3b, qwen3-235b-a22b.")
@click.option("--gpu-mem", default=None, help="GPU memory budget, e.g. 8G; 0 runs on the CPU (default: the GPU's memory).")
@click.option("--ctx", default=4096, show_default=True, type=click.IntRange(min=1), help="Context length to hold.")
@click.option("--profile", default=None, help="Hardware profile: a name in profiles/ or a YAML file.")
@click.option("--prompt", "prompt_tokens", default=2048, show_default=True, type=click.IntRange(min=1),
              help="Prompt length for the prefill prediction.")
@click.option("--quant", type=click.Choice(["int4", "none"]), default="int4", show_default=True,
              help="Format of the routed experts.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(model_dir: Path | None, preset: str | None, gpu_mem: str | None, ctx: int, profile: str | None,
         prompt_tokens: int, quant: str, as_json: bool) -> None:
    """Show where a model's tensors go on a machine, and how fast it will run."""
    import json

    from offload.config import args_from_dict, load_config
    from offload.hardware import parse_size
    from offload.errors import OffloadError
    from offload.planner import make_plan
    from offload.synthetic import preset_config

    if (model_dir is None) == (preset is None):
        raise click.UsageError("give exactly one of --model DIR or --preset NAME")
    args = load_config(model_dir) if model_dir else args_from_dict(preset_config(preset))
    hardware, profile_source = _resolve_profile(profile)
    budget = parse_size(gpu_mem, "--gpu-mem") if gpu_mem is not None else None
    if budget and hardware.gpu is None:
        raise OffloadError(f"profile {hardware.name} has no GPU; pass --gpu-mem 0 to plan for the CPU, "
                           "or --profile for a machine with a GPU")
    result = make_plan(args, hardware, budget, ctx=ctx, quant=quant if quant != "none" else "none",
                       prompt_tokens=prompt_tokens, model_name=preset or str(model_dir))
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
