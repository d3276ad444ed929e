"""What `offload serve` costs a client: time to first token and decode speed seen through the
OpenAI API (streamed, the `openai` package) against the engine's own, same prompt, same machine.

    python bench/server.py [--model DIR] [--prompt 128] [--tokens 64] [--runs 3]
    python bench/server.py --parallel [--model DIR] [--tokens 64] [--slots 4] [--runs 3]

Default model: `bench/decode.py`'s 8-layer Qwen3-Next slice (real per-token shapes), CPU only.
Each run starts from a fresh sequence (no prefix reuse) and decodes greedily; the engine's figures
come from `Engine.stream` timed in-process, the client's from the arrival of streamed chunks (one
per token). As under `offload serve`, the engine runs on the main thread, uvicorn on another.
Prints the medians and the server's overhead as a ratio.

--parallel: several conversations at once. Aggregate decode tok/s with 1, 2, 4 and 8 clients
streaming at once (16-token prompts, --tokens each), counted two ways: the tokens that arrive
while every stream decodes (from the last stream's first token to the first stream's last; on
a one-slot server, where they take turns, end to end), and
end to end (every token after each stream's first, from the first stream's first token to the
last token of all, which the prompts' reading one after another eats into); the median of --runs
rounds, each of every count in turn and printed with what the machine ran at just before it (RAM
read bandwidth, and four tokens' int8 dot products on a matrix in cache: on a shared machine the
two move, and not together); four clients against one: the median of the rounds' ratios; and the
time to first token of a short request sent while three long answers stream, against an idle
server's; each on a server with --slots slots and on a one-slot server, same run. The clients
run in a process of their own, as a server's clients do: in the server's process their parsing of
the streams would take turns with the engine for Python's lock.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
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
from offload.kernels import int4  # noqa: E402
from offload.kernels.membw import read_bandwidth  # noqa: E402
from offload.kernels.probe import dense_throughput  # noqa: E402
from offload.kernels.threads import kernel_threads, physical_cores  # noqa: E402
from offload.sampling import SamplingParams  # noqa: E402
from offload.server import Http, Service  # noqa: E402

CLIENT_COUNTS = (1, 2, 4, 8)  # --parallel: clients streaming at once


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


def serving(service: Service, work) -> None:
    """Run `work()` on a thread while the service runs on this one (as `offload serve`), then stop."""
    failed = []

    def run():
        try:
            work()
        except BaseException as error:  # raised again on this thread
            failed.append(error)
        finally:
            service.stop()

    thread = threading.Thread(target=run)
    thread.start()
    service.work()
    thread.join()
    if failed:
        raise failed[0]


def together(client, prompts: list[list[int]], tokens: int) -> tuple[float, float]:
    """Aggregate decode tok/s of streamed completions of `prompts`, all sent at once, two ways:
    while every stream decodes (the tokens that arrive from the last stream's first token to the
    first stream's last; what `llama-batched-bench` calls the generation speed; end to end where
    they never all stream at once, as on a server with fewer slots), and end to end
    (every token after each stream's first, from the first stream's first token to the last token
    of all: the prompts read one after another eat into it)."""
    arrivals: list[list[float]] = [[] for _ in prompts]

    def ask(i):
        for chunk in client.completions.create(model="bench", prompt=prompts[i], max_tokens=tokens, temperature=0,
                                               stream=True):
            if chunk.choices and chunk.choices[0].text is not None:  # one chunk per token
                arrivals[i].append(time.perf_counter())

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    decoded = sum(len(times) - 1 for times in arrivals)
    whole = decoded / (max(times[-1] for times in arrivals) - min(times[0] for times in arrivals))
    begun, ended = max(times[0] for times in arrivals), min(times[-1] for times in arrivals)
    if ended <= begun:  # they never all streamed at once (a server with fewer slots)
        return whole, whole
    return sum(begun < t <= ended for times in arrivals for t in times) / (ended - begun), whole


def first_token_beside(client, long_prompts: list[list[int]], short: list[int], tokens: int) -> float:
    """Seconds to the first token of `short` (8 tokens asked) while `long_prompts` stream answers."""
    streaming = threading.Barrier(len(long_prompts) + 1)

    def long_answer(prompt):
        stream = client.completions.create(model="bench", prompt=prompt, max_tokens=tokens, temperature=0,
                                           stream=True)
        waited = False
        for _ in stream:
            if not waited:
                waited = True
                streaming.wait()

    threads = [threading.Thread(target=long_answer, args=(p,)) for p in long_prompts]
    for thread in threads:
        thread.start()
    streaming.wait()  # every long answer has its first token
    first = client_run(client, short, 8)[0]
    for thread in threads:
        thread.join()
    return first


class MachineState:
    """What paces one row and what paces four, measured between rounds (this machine's speeds
    move, and not together): RAM read bandwidth (1 GiB, all cores) and four tokens' int8 dot
    products on one int4 matrix held in cache (`kernels.probe.dense_throughput`), in GB/s of
    weights."""

    def __init__(self):
        self.values = np.ones(2**28, np.float32)

    def measure(self) -> tuple[float, float]:
        """(RAM GB/s, four tokens' dot products GB/s from cache)."""
        threads = physical_cores()
        bandwidth = read_bandwidth(self.values, threads)
        with kernel_threads(threads):
            products = dense_throughput("int4", 4, pool_bytes=0)  # multiply-adds/s; a pool of one matrix: from cache
        return bandwidth / 1e9, products / 4 * int4.FORMAT.bits_per_weight / 8 / 1e9


def clients_work(url: str, prompts: list[list[int]], short: list[int], tokens: int, runs: int, slots: int) -> dict:
    """The --parallel measurements against the server at `url`, run in a process of their own
    (as a server's clients are): their streams' parsing does not take the server's GIL."""
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    # warm-up: every prompt at once, to the end, so the first round's runs find the weights mapped
    # (a short answer alone touched few of the experts, and the first round's one client paid for
    # the rest: 29-33 tok/s against 39-55 in the rounds after it)
    together(client, prompts, tokens)
    rates: dict[int, list[tuple[float, float]]] = {count: [] for count in CLIENT_COUNTS}
    state = MachineState()
    for _ in range(runs):  # rounds of every count in turn: a shared machine's slow spells fall on each alike
        ram, dots = state.measure()  # the server idles meanwhile
        for count in CLIENT_COUNTS:
            rates[count].append(together(client, prompts[:count], tokens))
        print(f"  {slots} slot(s): " + ", ".join(f"{count} client(s) {rates[count][-1][0]:.1f}" for count in CLIENT_COUNTS)
              + f" tok/s; 4 vs 1 {rates[4][-1][0] / rates[1][-1][0]:.2f}x; before it RAM {ram:.0f} GB/s, "
              f"4-token dots {dots:.0f} GB/s", flush=True)
    rows = {}
    for way in (0, 1):  # while every stream decodes, end to end
        for count in CLIENT_COUNTS:
            rows[count, way] = statistics.median(rate[way] for rate in rates[count])
        rows["4 vs 1", way] = statistics.median(four[way] / one[way] for four, one in zip(rates[4], rates[1]))  # per round
    rows["idle"] = statistics.median(client_run(client, short, 8)[0] for _ in range(3))
    rows["beside"] = statistics.median(first_token_beside(client, prompts[1:4], short, tokens) for _ in range(3))
    return rows


def serve_parallel(options, path: Path, slots: int, clients: ProcessPoolExecutor, prompts: list[list[int]],
                   short: list[int]) -> dict:
    """`clients_work` against a server with `slots` slots on the model at `path`, run in `clients`."""
    engine = offload.load(path, quant="int4", gpu_mem=0, ctx=options.tokens + 64, slots=slots)
    engine.stop_ids = set()
    service = Service(engine, offload.Tokenizer(path), "bench", SamplingParams(), snapshots=0, max_queue=64)
    http = Http(service)
    rows = {}

    def work():
        rows.update(clients.submit(clients_work, http.url, prompts, short, options.tokens, options.runs,
                                   slots).result())

    serving(service, work)
    http.stop()
    return rows


def parallel(options, path: Path) -> None:
    rng = np.random.default_rng(1)
    vocab = offload.config.load_config(path).vocab_size
    prompts = [rng.integers(1, vocab, 16).tolist() for _ in range(max(CLIENT_COUNTS))]
    short = rng.integers(1, vocab, 16).tolist()
    results = {}
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as clients:
        for slots in (1, options.slots):
            results[slots] = serve_parallel(options, path, slots, clients, prompts, short)
    one, many = results[1], results[options.slots]
    print(f"\n{cpu_model()}, {physical_cores()} threads; {path.name}; 16-token prompts, {options.tokens} tokens "
          f"each, greedy")
    print(f"{'':<38} {'1 slot':>9} {f'{options.slots} slots':>9}  ratio")
    for way, words in ((0, "aggregate decode tok/s"), (1, "end to end tok/s")):
        for count in CLIENT_COUNTS:
            print(f"{f'{words}, {count} client(s)':<38} {one[count, way]:9.1f} {many[count, way]:9.1f}  "
                  f"{many[count, way] / one[count, way]:.2f}x")
        print(f"{f'{words}: 4 clients vs 1':<38} {one['4 vs 1', way]:8.2f}x {many['4 vs 1', way]:8.2f}x  "
              "(within a round)")
    for key, words in (("idle", "first token, idle server (s)"), ("beside", "first token beside 3 answers (s)")):
        print(f"{words:<38} {one[key]:9.3f} {many[key]:9.3f}  {many[key] / one[key]:.2f}x")
    print(f"{'beside 3 answers vs idle':<38} {'':>9} {many['beside'] / many['idle']:8.2f}x")
    print("aggregate decode: tokens arriving while every stream decodes; end to end: every token after each "
          "stream's first, from the first stream's first token to the last (the prompts' reading included)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--tokens", type=int, default=64, help="tokens to generate")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--parallel", action="store_true", help="several clients at once (see above)")
    parser.add_argument("--slots", type=int, default=4, help="--parallel: the server's slots")
    options = parser.parse_args()
    path = options.model or slice_dir(8, 128)
    if options.parallel:
        parallel(options, path)
        return
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
