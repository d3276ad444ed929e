"""What `offload serve` costs a client: time to first token and decode speed seen through the
OpenAI API (streamed, the `openai` package) against the engine's own, same prompt, same machine.

    python bench/server.py [--model DIR] [--prompt 128] [--tokens 64] [--runs 3]

Default model: `bench/decode.py`'s 8-layer Qwen3-Next slice (real per-token shapes), CPU only.
Each run starts from a fresh sequence (no prefix reuse) and decodes greedily; the engine's figures
come from `Engine.stream` timed in-process, the client's from the arrival of streamed chunks (one
per token). As under `offload serve`, the engine runs on the main thread, uvicorn on another.
Prints the medians and the server's overhead as a ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import offload  # noqa: E402  (this tree's; then the tree leaves the path, or its kernels/
sys.path.remove(str(ROOT))  # would shadow the `kernels` package transformers imports)
sys.path.insert(1, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import openai  # noqa: E402

from decode import slice_dir  # noqa: E402
from offload.hardware import cpu_model  # noqa: E402
from offload.kernels.threads import physical_cores  # noqa: E402
from offload.sampling import SamplingParams  # noqa: E402
from offload.server import Http, Service  # noqa: E402


def engine_run(engine, prompt: list[int], tokens: int) -> tuple[float, float, int]:
    """(seconds to the first token, decode tok/s after it, tokens) of `Engine.stream`."""
    engine.reset()
    started = time.perf_counter()
    times = [time.perf_counter() for _ in engine.stream(prompt, tokens, sampling=SamplingParams())]
    return times[0] - started, (len(times) - 1) / (times[-1] - times[0]), len(times)


def client_run(client, prompt: list[int], tokens: int) -> tuple[float, float, int]:
    """The same through the server: a streamed completion of the same token ids."""
    started = time.perf_counter()
    arrivals, generated = [], 0
    for chunk in client.completions.create(model="bench", prompt=prompt, max_tokens=tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].text is not None:  # one chunk per token
            arrivals.append(time.perf_counter())
        if chunk.usage:
            generated = chunk.usage.completion_tokens
    return arrivals[0] - started, (generated - 1) / (arrivals[-1] - arrivals[0]), generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--tokens", type=int, default=64, help="tokens to generate")
    parser.add_argument("--runs", type=int, default=3)
    options = parser.parse_args()
    path = options.model or slice_dir(8, 128)
    engine = offload.load(path, quant="int4", gpu_mem=0, ctx=options.prompt + options.tokens + 64)
    engine.stop_ids = set()  # decode exactly --tokens tokens on both sides
    service = Service(engine, offload.Tokenizer(path), "bench", SamplingParams(), snapshots=0)
    http = Http(service)
    client = openai.OpenAI(base_url=http.url, api_key="none", max_retries=0)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1000, 20000, options.prompt).tolist() for _ in range(options.runs + 1)]
    own = [engine_run(engine, prompt, options.tokens) for prompt in prompts]  # the first is a warm-up
    seen = []

    def clients():
        try:
            seen.extend(client_run(client, prompt, options.tokens) for prompt in prompts)
        finally:
            service.stop()

    asking = threading.Thread(target=clients)
    asking.start()
    service.work()  # the engine on the main thread, as `offload serve` runs it
    asking.join()
    http.stop()

    def median(rows, index):
        return statistics.median(row[index] for row in rows[1:])

    print(f"{cpu_model()}, {physical_cores()} threads; {path.name}; prompt {options.prompt} tokens, "
          f"{options.tokens} generated, median of {options.runs}")
    print(f"{'':<24} {'engine':>10} {'via server':>11}  overhead")
    first_own, first_seen = median(own, 0), median(seen, 0)
    rate_own, rate_seen = median(own, 1), median(seen, 1)
    print(f"{'time to first token':<24} {first_own:9.3f}s {first_seen:10.3f}s  {first_seen / first_own - 1:+.1%}")
    print(f"{'decode tok/s':<24} {rate_own:10.1f} {rate_seen:11.1f}  {rate_own / rate_seen - 1:+.1%}")


if __name__ == "__main__":
    main()
