"""The hybrid runtime on a CUDA machine, in one run: tests, then speed and memory against the plan.

    python3 bench/gpu.py --out gpu.json            # on the CUDA machine, ~5-8 minutes
    python3 bench/gpu.py --device cpu --layers 2 --experts 16 --prompts 64,600 --skip-tests
                                                  # a rehearsal on the CPU stand-in (no CUDA)

Steps: `pytest -m gpu` (the CUDA-only tests); build (or reuse) the 8-layer, 128-expert slice of
Qwen3-Next-80B-A3B (real per-token shapes) with `offload synth`; measure this machine with
`offload.hardware.detect(quick=True)` so the plan predicts for it; then, on the slice:
- decode tok/s: hybrid (gpu_mem=8G: dense work on the GPU, routed experts on the CPU), with the
  device and the CPU working concurrently and serialised, against CPU-only (gpu_mem=0) on the
  same machine;
- prefill tok/s for each prompt length: path (a) (CPU experts, chunks pipelined and not), path (b)
  (experts streamed to the GPU), and CPU-only;
- peak device memory against the plan's `gpu_bytes`, predicted decode against measured;
and prints them as ratios beside the card and CPU, also as JSON (--out). It fails (exit 1) when
CUDA is asked for and absent, or when a test fails.

A bare CUDA machine may lack some of offload's dependencies (humanfriendly, prompt_toolkit,
wcwidth): carry them as wheels and put them on PYTHONPATH; offload itself runs from the source
tree (this script puts the repository on sys.path).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "bench"))  # after the tree: bench/kernels.py is not the package

import offload  # noqa: E402
from decode import slice_dir  # noqa: E402
from offload.hardware import detect, write_profile  # noqa: E402
from offload.placement import torch_device_name  # noqa: E402

TARGETS = {"hybrid decode vs CPU-only": 2.0, "streamed prefill vs CPU prefill (a), longest prompt": 5.0,
           "peak device memory vs plan": 1.05, "predicted decode vs measured": 0.30}


def cpu_description() -> dict:
    model, flags = platform.processor(), ""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                model = value.strip()
            elif key.strip() == "Flags":
                flags = value.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    return {"model": model, "cores": os.cpu_count(), "flags": [f for f in wanted if f in flags.split()]}


def run_gpu_tests() -> dict:
    """`pytest -m gpu` over the test files that hold gpu tests (the others may import test-only
    packages a bare CUDA machine lacks, such as pexpect)."""
    files = sorted(str(path) for path in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in path.read_text())
    print(f"pytest -m gpu ({len(files)} files) ...", flush=True)
    started = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files],
                            capture_output=True, text=True, cwd=ROOT, env=env)
    tail = (result.stdout + result.stderr).strip().splitlines()[-15:]
    print("\n".join(f"  {line}" for line in tail), flush=True)
    return {"exit_code": result.returncode, "seconds": round(time.perf_counter() - started, 1), "tail": tail}


def decode_tok_s(engine, steps: int) -> float:
    engine.reset()
    engine.feed(list(range(1, 17)), all_logits=False)
    engine.feed([17], all_logits=False)  # warm-up step
    times = []
    for i in range(steps):
        started = time.perf_counter()
        engine.feed([100 + i], all_logits=False)  # returns logits on the host: the step is complete
        times.append(time.perf_counter() - started)
    return 1 / statistics.median(times)


def prefill_tok_s(engine, tokens: int) -> float:
    prompt = np.arange(tokens) % 1000 + 1
    best = float("inf")
    for _ in range(2):  # the first run also warms up (kernel compilation, allocator, cuBLAS)
        engine.reset()
        started = time.perf_counter()
        engine.feed(prompt, all_logits=False)
        best = min(best, time.perf_counter() - started)
    return tokens / best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a rehearsal on the stand-in)")
    parser.add_argument("--gpu-mem", default="8G")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed")
    parser.add_argument("--prompts", default="512,2048", help="prompt lengths for prefill")
    parser.add_argument("--skip-tests", action="store_true")
    options = parser.parse_args()
    device = torch.device(options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: CUDA was asked for but torch sees no CUDA device (a CPU build of torch, or no driver); "
              "run on the CUDA machine, or pass --device cpu for a rehearsal", file=sys.stderr)
        return 1
    started = time.perf_counter()
    results: dict = {"cpu": cpu_description(), "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        results["card"] = {"name": properties.name, "memory_gib": round(properties.total_memory / 2**30, 1)}
    print(f"card: {results.get('card', {}).get('name', 'none (CPU stand-in)')}; CPU: {results['cpu']['model']}, "
          f"{results['cpu']['cores']} cores, {' '.join(results['cpu']['flags'])}", flush=True)
    if not options.skip_tests:
        results["tests"] = run_gpu_tests()

    path = slice_dir(options.layers, options.experts)
    print("measuring this machine (quick) ...", flush=True)
    hardware = detect(progress=lambda line: print(f"  {line}", flush=True), quick=True)
    profile = Path(tempfile.mkdtemp()) / "profile.yaml"
    write_profile(hardware, profile, comment="bench/gpu.py, quick detection")
    lengths = [int(n) for n in options.prompts.split(",")]
    ctx = max(lengths) + 64
    if device.type == "cpu" and hardware.gpu is None:  # the rehearsal plans for the reference box's GPU
        profile = "rtx4060-ddr5"

    print("loading the slice: hybrid and CPU-only ...", flush=True)
    hybrid = offload.load(path, quant="int4", gpu_mem=options.gpu_mem, profile=str(profile), device=str(device),
                          ctx=ctx, prefill="cpu")
    cpu_only = offload.load(path, quant="int4", gpu_mem=0, profile=str(profile), ctx=ctx, prefill="cpu")
    plan = hybrid.plan
    results["plan"] = {"gpu_bytes": plan.gpu_bytes, "predicted_decode_tok_s": plan.predicted.decode_tok_s,
                       "decode_bound": plan.predicted.decode_bound,
                       "stream_from_tokens": plan.predicted.stream_from_tokens}
    results["placement"] = hybrid.placement

    print("decode ...", flush=True)
    executor = hybrid.executor
    decode = {"hybrid": decode_tok_s(hybrid, options.steps)}
    executor.concurrent = False
    decode["hybrid, serialised"] = decode_tok_s(hybrid, options.steps)
    executor.concurrent = True
    decode["cpu-only"] = decode_tok_s(cpu_only, options.steps)
    results["decode_tok_s"] = decode

    prefill: dict = {}
    for tokens in lengths:
        print(f"prefill {tokens} ...", flush=True)
        row = {}
        hybrid.prefill, hybrid.pipelined = "cpu", True
        row["(a) pipelined"] = prefill_tok_s(hybrid, tokens)
        hybrid.pipelined = False
        row["(a)"] = prefill_tok_s(hybrid, tokens)
        hybrid.prefill = "stream"
        row["(b) streamed"] = prefill_tok_s(hybrid, tokens)
        row["cpu-only"] = prefill_tok_s(cpu_only, tokens)
        prefill[tokens] = row
    hybrid.prefill, hybrid.pipelined = "auto", device.type == "cuda"
    results["prefill_tok_s"] = prefill
    peak = hybrid.gpu_peak_bytes
    results["peak_device_bytes"] = peak

    longest = prefill[max(lengths)]
    ratios = {"hybrid decode vs CPU-only": decode["hybrid"] / decode["cpu-only"],
              "concurrency (hybrid vs serialised decode)": decode["hybrid"] / decode["hybrid, serialised"],
              "streamed prefill vs CPU prefill (a), longest prompt": longest["(b) streamed"] / longest["(a)"],
              "pipelined vs plain prefill (a), longest prompt": longest["(a) pipelined"] / longest["(a)"],
              "peak device memory vs plan": peak / plan.gpu_bytes if device.type == "cuda" else None,
              "predicted decode vs measured": plan.predicted.decode_tok_s / decode["hybrid"] - 1}
    results["ratios"] = ratios
    results["seconds"] = round(time.perf_counter() - started, 1)

    where = torch_device_name(device)
    print(f"\nQwen3-Next slice, {options.layers} layers x {options.experts} experts; GPU share on {where}, "
          f"routed experts on {results['cpu']['cores']} CPU cores")
    for name, value in decode.items():
        print(f"  decode {name:<22} {value:8.1f} tok/s")
    for tokens, row in prefill.items():
        print(f"  prefill {tokens:>5}: " + ", ".join(f"{name} {value:.0f}" for name, value in row.items()) + " tok/s")
    print(f"  plan: decode {plan.predicted.decode_tok_s:.1f} tok/s ({plan.predicted.decode_bound}); "
          f"GPU {plan.gpu_bytes / 2**30:.2f} GiB, peak {peak / 2**30:.2f} GiB")
    for name, value in ratios.items():
        target = TARGETS.get(name)
        shown = "n/a" if value is None else f"{value:+.0%}" if name.startswith("predicted") else f"{value:.2f}x"
        print(f"  {name:<55} {shown:>8}" + (f"   (target {'±' if name.startswith('predicted') else ''}"
                                             f"{target:.0%})" if name.startswith("predicted") else
                                             f"   (target {'≤' if 'memory' in name else '≥'} {target}x)"
                                             if target else ""))
    if options.out:
        options.out.write_text(json.dumps(results, indent=2, default=str))
        print(f"wrote {options.out}")
    return 1 if results.get("tests", {}).get("exit_code", 0) not in (0, 5) else 0


if __name__ == "__main__":
    sys.exit(main())
