"""The `offload` command line."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

DEMO_PRESET = "demo-qwen3-next"


def _cache_dir() -> Path:
    root = os.environ.get("OFFLOAD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "offload")
    return Path(root)


class OffloadGroup(click.Group):
    """Turns OffloadError into one line on stderr and exit code 1 (a traceback with --debug)."""

    def invoke(self, ctx: click.Context):
        from offload.errors import OffloadError

        try:
            return super().invoke(ctx)
        except OffloadError as e:
            if ctx.params.get("debug"):
                raise
            click.echo(f"error: {e}", err=True)
            ctx.exit(1)


@click.group(cls=OffloadGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.version_option(package_name="offload")
def main(debug: bool) -> None:
    """Run huge sparse Mixture-of-Experts models on a small GPU and a lot of RAM."""


def _demo_model() -> Path:
    """The cached demo checkpoint, built on first use."""
    from offload.synthetic import checkpoint_nbytes, preset_config, synthesize

    path = _cache_dir() / DEMO_PRESET
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
@click.option("--gpu-mem", default=None, help="GPU memory budget, e.g. 8G (not used yet).")
def run(model_dir: Path | None, demo: bool, ids_text: str | None, max_tokens: int, temperature: float,
        seed: int | None, ctx: int | None, gpu_mem: str | None) -> None:
    """Generate from a prompt of token ids."""
    import offload

    if demo == (model_dir is not None):
        raise click.UsageError("give exactly one of --model DIR or --demo")
    if demo:
        model_dir = _demo_model()
    started = time.perf_counter()
    engine = offload.load(model_dir, gpu_mem=gpu_mem, ctx=ctx)
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


if __name__ == "__main__":
    main()
