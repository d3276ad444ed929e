"""The hybrid runtime on a CUDA machine, in one run: tests, then speed and memory against the plan.

    python3 bench/gpu.py    # on the CUDA machine, from the repository root: ~4-6 minutes
    python3 bench/gpu.py --device cpu --layers 2 --experts 16 --vocab 4096 --prompts 64,600 --skip-tests --steps 4
                            # a rehearsal on the CPU stand-in (no CUDA): ~25 s on 2 cores, ~80 s
                            # while Numba's cache is empty

What it needs: Python with torch (a CUDA build), numpy, numba, safetensors, psutil, pyyaml, tqdm,
tokenizers and jinja2; pytest and transformers for the tests; ~10 GB of disk in the cache
($OFFLOAD_CACHE, else ~/.cache/offload). Nothing is installed: offload runs from the source tree
(this script puts the repository on sys.path), and neither the script nor what it loads imports
humanfriendly, prompt_toolkit, wcwidth or the server's packages. The gpu tests read YAML hardware
profiles, which takes humanfriendly: without it they are skipped with a line saying so. Pure-Python
wheels in .whl/ (ignored by git) are put on the path as they are, so carrying humanfriendly's is
enough: `python3 -m pip download --no-deps --only-binary=:all: humanfriendly==10.0 -d .whl`.

Phases, each with a budget printed up front (for the CUDA machine and the default slice) and its
time printed when it ends:
- prepare (150 s): build (or reuse) the 8-layer, 128-expert slice of Qwen3-Next-80B-A3B (real
  per-token shapes, ~8 GB) and then its int4 expert store on one thread, while another compiles
  the CPU kernels (Numba caches them per CPU, so a new machine compiles them all) by running a
  tiny model's prefill and decode and the probes of `detect`;
- tests (180 s, beside prepare): `pytest -m gpu` (the CUDA-only tests) in a subprocess;
- detect (30 s): `offload.hardware.detect(quick=True)`, so the plan predicts for this machine
  (on the stand-in, the CPU plays the GPU at its measured rates);
- load (60 s): the slice, hybrid (--gpu-mem, 8 GiB: dense work on the GPU, routed experts on
  the CPU) and CPU-only (gpu_mem=0) on the same machine;
- decode (30 s): tok/s hybrid, with the device and the CPU working concurrently and serialised,
  with each step's device work replayed from CUDA graphs (`offload.graphs`; on the stand-in the
  same code eagerly), and CPU-only; and the aggregate of 4 sequences decoded together
  (`Engine.step`, as `offload serve --parallel 4` does), hybrid and CPU-only;
- prefill N (20 + N / 50 s), for each prompt length: tok/s by path (a) (CPU experts,
  chunks pipelined and not), path (b) (experts streamed to the GPU) beside its bound (every
  layer's experts once over the measured host-to-device bandwidth), and CPU-only;
then peak device memory against the plan's `gpu_bytes` and predicted decode against measured,
printed as ratios beside the card and CPU, with their targets. About 390 s in all; a phase that
would start after --budget seconds (480) is skipped and recorded as skipped, a phase that fails
is recorded and the run goes on, and a run still going a minute past the budget is stopped.
pytest is stopped at its budget.

Before torch and Numba are imported it sets, unless already set: OMP_WAIT_POLICY=PASSIVE (idle
OpenMP threads of torch must not spin on the cores Numba's kernels run on), OMP_NUM_THREADS and
NUMBA_NUM_THREADS to the physical cores; it prints what it chose.

Results, as JSON: --out, else $OUT/gpu.json when OUT is set, with gpu.log (what was printed),
gpu-pytest.log and gpu-profile.yaml (the measured profile) beside it; rewritten atomically as
each phase ends, so a killed run leaves what it measured. Exit 1 when CUDA is asked for and
absent, a test fails or times out, a phase fails or the run is stopped; 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

import psutil

STARTED = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import offload  # noqa: E402  (this tree's; then the tree leaves the path, or its kernels/
sys.path.remove(str(ROOT))  # would shadow the `kernels` package transformers imports)
sys.path.insert(1, str(ROOT / "bench"))
# pure-Python wheels carried to a bare machine (e.g. humanfriendly, for the gpu tests' YAML
# profiles) are importable as they are: zip files on the path
WHEELS = sorted(str(wheel) for wheel in (ROOT / ".whl").glob("*-py3-none-any.whl"))
sys.path += WHEELS


def choose_threads() -> dict[str, tuple[str, bool]]:
    """Thread settings for torch's OpenMP pool and Numba's, where the caller has not set them:
    one thread per physical core (as `kernels.threads.physical_cores`), and OpenMP threads that
    sleep when idle (spinning, torch's would take the cores Numba's kernels run on). name ->
    (value, given by the caller)."""
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    chosen = {}
    for name, value in (("OMP_WAIT_POLICY", "PASSIVE"), ("OMP_NUM_THREADS", str(cores)),
                        ("NUMBA_NUM_THREADS", str(cores))):
        given = name in os.environ
        os.environ.setdefault(name, value)
        chosen[name] = (os.environ[name], given)
    return chosen


THREADS = choose_threads()  # before numpy, torch and numba are imported: they read these once

import numpy as np  # noqa: E402
import torch  # noqa: E402

from decode import slice_dir  # noqa: E402
from offload.config import load_config  # noqa: E402
from offload.graphs import GraphedDecode  # noqa: E402
from offload.hardware import CPU, GPU, HardwareProfile, cpu_model, detect, write_profile  # noqa: E402
from offload.placement import torch_device_name  # noqa: E402
from offload.store import open_store  # noqa: E402
from offload.synthetic import preset_config, synthesize  # noqa: E402

SEQUENCES = 4  # decoded together in the batched rows (`offload serve --parallel`'s default)
TARGETS = {"hybrid decode vs CPU-only": 2.0, "streamed prefill vs CPU prefill (a), longest prompt": 5.0,
           "peak device memory vs plan": 1.05, "predicted decode vs measured": 0.30,
           f"hybrid decode, {SEQUENCES} sequences together vs one": 2.0}
OVERRUN_SECONDS = 60  # past the budget, a run that is still going is stopped
CHILDREN: set[subprocess.Popen] = set()  # stopped with the run


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, without the usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    if not re.fullmatch(r"\s*\d+\s*", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def prompt_lengths(text: str) -> list[int]:
    try:
        lengths = [positive_int(n) for n in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of prompt lengths; write e.g. 512,2048") from None
    return lengths


def vocab_size(text: str) -> int:
    if positive_int(text) < 300:
        raise argparse.ArgumentTypeError(f"{text!r} is too small a vocabulary for the slice's byte-level "
                                         "tokenizer; use at least 300")
    return int(text)


def device_name(text: str) -> str:
    if not re.fullmatch(r"cuda(:\d+)?|cpu", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; write cuda, cuda:N or cpu")
    return text


def gib(text: str) -> int:
    """'8', '8G', '8GiB' -> bytes. GiB only, so that no size library is needed."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*(?:G|GB|GiB)?\s*", text, re.IGNORECASE)
    if not match or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a GPU budget in GiB; write e.g. 8 or 8G")
    return int(float(match[1]) * 2**30)


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


class Tee:
    """A stream that also appends what it is given to the log."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.log.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def save(results: dict, path: Path | None) -> None:
    """Write atomically (temp file + rename): a reader, or a killed run, sees a whole file."""
    if path is None:
        return
    temp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
    temp.write_text(json.dumps(results, indent=2, default=str))
    temp.replace(path)


class Phases:
    """The run's phases against its total budget: each prints its budget up front and its time
    when it ends, and is recorded in the results, saved as it ends. One that would start after
    the budget is spent, or after a phase it needs did not complete, is skipped."""

    def __init__(self, budgets: dict[str, tuple[int, str]], total: float, results: dict, path: Path | None):
        self.budgets, self.total, self.results, self.path = budgets, total, results, path
        self.records: dict[str, dict] = results.setdefault("phases", {})
        self.begun: dict[str, float] = {}

    def table(self, expected: int) -> None:
        print(f"phases (a phase that would start after --budget {self.total:.0f} s is skipped):")
        for name, (budget, what) in self.budgets.items():
            print(f"  {name:<14} {budget:>4} s  {what}")
        print(f"  {'in all':<14} {expected:>4} s  of --budget {self.total:.0f} s", flush=True)
        self.results["budget_s"] = {"total": self.total, **{name: budget for name, (budget, _) in self.budgets.items()}}

    def skip(self, name: str, reason: str) -> bool:
        print(f"== {name}: skipped, {reason}", flush=True)
        self.records[name] = {"status": "skipped", "reason": reason, "budget_s": self.budgets[name][0]}
        save(self.results, self.path)
        return False

    def begin(self, name: str, needs: tuple[str, ...] = ()) -> bool:
        elapsed = time.perf_counter() - STARTED
        if elapsed >= self.total:
            return self.skip(name, f"the {self.total:.0f} s budget is spent ({elapsed:.0f} s in)")
        missing = [need for need in needs if self.records.get(need, {}).get("status") != "done"]
        if missing:
            return self.skip(name, f"it needs {' and '.join(missing)}, which did not complete")
        print(f"== {name} (budget {self.budgets[name][0]} s, {elapsed:.0f} s in) ...", flush=True)
        self.begun[name] = time.perf_counter()
        self.records[name] = {"status": "running", "budget_s": self.budgets[name][0]}
        return True

    def end(self, name: str, status: str = "done") -> None:
        took = time.perf_counter() - self.begun[name]
        budget = self.budgets[name][0]
        self.records[name].update(status=status, seconds=round(took, 1))
        over = f", over its {budget} s budget" if took > budget else ""
        print(f"== {name}: {status} in {took:.1f} s (budget {budget} s{over})", flush=True)
        save(self.results, self.path)

    def run(self, name: str, work: Callable, needs: tuple[str, ...] = ()):
        """work() as phase `name`: its value, or None when skipped or failed (the traceback is
        printed and the run goes on)."""
        if not self.begin(name, needs):
            return None
        try:
            value = work()
        except Exception:
            traceback.print_exc()
            self.end(name, "failed")
            return None
        self.end(name)
        return value


def phase_budgets(lengths: list[int], skip_tests: bool) -> tuple[dict[str, tuple[int, str]], int]:
    """Seconds each phase is expected to take on the CUDA machine with the default slice: name ->
    (seconds, what it does), and the run's expected seconds in all."""
    budgets = {"prepare": (150, "the slice (~70 s) and its int4 store, beside the kernels' compilation (~60 s)"),
               "tests": (180, "pytest -m gpu, beside prepare" + (" (--skip-tests)" if skip_tests else "")),
               "detect": (30, "this machine's RAM, kernels and GPU, quick"),
               "load": (60, "the slice, hybrid and CPU-only"),
               "decode": (30, "hybrid, serialised and CPU-only")}
    for tokens in lengths:
        budgets[f"prefill {tokens}"] = (20 + tokens // 50, "(a) pipelined, (a), (b) streamed and CPU-only")
    expected = sum(budget for name, (budget, _) in budgets.items() if name != "tests")
    if not skip_tests:  # beside prepare
        expected += max(0, budgets["tests"][0] - budgets["prepare"][0])
    return budgets, expected


def run_command(command: list[str], timeout: float, **options) -> tuple[int | None, str]:
    """(exit code, or None when it ran past `timeout` seconds and was stopped with everything it
    started; its output)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               errors="replace", start_new_session=True, **options)
    CHILDREN.add(process)
    try:
        output, _ = process.communicate(timeout=timeout)
        return process.returncode, output
    except subprocess.TimeoutExpired:
        kill_group(process)
        return None, process.communicate()[0]
    finally:
        CHILDREN.discard(process)


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # it has ended meanwhile
        pass


def cpu_description() -> dict:
    flags = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.partition(":")[2].split()
                break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    return {"model": cpu_model(), "cores": os.cpu_count(), "physical_cores": psutil.cpu_count(logical=False),
            "flags": [f for f in wanted if f in flags]}


def gpu_test_files() -> list[str]:
    """The test files that hold gpu tests (the others may import test-only packages a bare CUDA
    machine lacks, such as pexpect or hypothesis)."""
    return sorted(str(path) for path in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in path.read_text())


def tests_cannot_run() -> str | None:
    """Why the gpu tests cannot run here, or None."""
    try:
        import humanfriendly  # noqa: F401
    except ImportError:
        return ("the gpu tests read YAML hardware profiles, which takes humanfriendly, and it is not installed "
                "(carry its wheel in .whl/: `python3 -m pip download --no-deps --only-binary=:all: "
                "humanfriendly==10.0 -d .whl`)")
    return None


def run_gpu_tests(timeout: float, log: Path | None) -> dict:
    files = gpu_test_files()
    print(f"pytest -m gpu ({len(files)} files, stopped after {timeout:.0f} s) ...", flush=True)
    started = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *WHEELS, os.environ.get("PYTHONPATH", "")]))
    code, output = run_command([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files],
                               timeout, cwd=ROOT, env=env)
    if log is not None:
        log.write_text(output)
    tail = output.strip().splitlines()[-15:]
    if code is None:
        print(f"pytest -m gpu: timed out after {timeout:.0f} s and was stopped; the end of its output:")
    print("\n".join(f"  {line}" for line in tail), flush=True)
    status = "timed out" if code is None else "done" if code in (0, 5) else "failed"  # 5: none collected
    return {"status": status, "exit_code": code, "seconds": round(time.perf_counter() - started, 1), "tail": tail}


def warm_kernels(lock: threading.Lock, cores: int) -> None:
    """Compile (or load from Numba's cache) the CPU kernels the run uses: a tiny Qwen3-Next's int4
    store, prefill and decode, CPU-only (int4 dense layers, an int6 lm_head, an int8 KV cache), and
    the probes of `detect` (RAM bandwidth, the int4 experts, int4 / int6 / int8 dense matrices)."""
    from offload.kernels.membw import read_bandwidth
    from offload.kernels.probe import decode_throughput, dense_throughput, pool_for

    # a CPU-only plan for the tiny model: what it predicts is not used
    placeholder = HardwareProfile("warm-up", CPU(physical_cores=cores, threads=cores,
                                                 ram=psutil.virtual_memory().total, ram_bandwidth=10e9))
    with tempfile.TemporaryDirectory() as scratch:
        model = synthesize(Path(scratch) / "model", preset_config("tiny-qwen3-next", dtype="bf16"))
        with lock:
            engine = offload.load(model, quant="int4", gpu_mem=0, profile=placeholder, ctx=256,
                                  store_dir=Path(scratch) / "store")
            engine.feed(np.arange(64) % 500 + 1, all_logits=False)
            for token in (7, 8):
                engine.feed([token], all_logits=False)
            read_bandwidth(np.ones(2**20, np.float32), cores)
            gate_up, down = pool_for(2048, 512, 0, minimum_experts=16)
            decode_throughput(gate_up, down, batch=1, top_k=10, calls=1)
            for fmt in ("int4", "int6", "int8"):
                for tokens in (1, 512):
                    dense_throughput(fmt, tokens, 0, calls=1)


class Preparation:
    """The slice checkpoint and then its int4 expert store on one thread, the kernels' compilation
    on another. Synthesis is single-threaded torch; the store build and the warm-up run Numba's
    parallel kernels, one thread at a time (`lock`)."""

    def __init__(self, layers: int, experts: int, vocab: int | None, cores: int):
        self.layers, self.experts, self.vocab, self.cores = layers, experts, vocab, cores
        self.lock = threading.Lock()
        self.path: Path | None = None
        self.seconds: dict[str, float] = {}
        self.errors: dict[str, BaseException] = {}
        self.started = time.perf_counter()
        self.threads = [threading.Thread(target=self._timed, args=(name, work), name=f"prepare-{name}", daemon=True)
                        for name, work in (("slice", self._slice), ("kernels", self._kernels))]

    def start(self) -> None:
        self.started = time.perf_counter()
        for thread in self.threads:
            thread.start()

    def _timed(self, name: str, work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException as error:  # reported by wait(), on the main thread
            self.errors[name] = error
            traceback.print_exc()

    def _ready(self, what: str) -> None:
        self.seconds[what] = round(time.perf_counter() - self.started, 1)
        print(f"  {what} ready after {self.seconds[what]:.1f} s", flush=True)

    def _slice(self) -> None:
        path = slice_dir(self.layers, self.experts, self.vocab)
        self._ready("slice")
        args = load_config(path)
        with self.lock:
            open_store(path, args, announce=lambda line: print(f"  {line}", flush=True))
        self.path = path
        self._ready("int4 store")

    def _kernels(self) -> None:
        warm_kernels(self.lock, self.cores)
        self._ready("kernels")

    def wait(self) -> Path:
        for thread in self.threads:
            thread.join()
        if "kernels" in self.errors:  # not fatal: the kernels compile on first use instead
            print(f"  warming the kernels failed ({self.errors['kernels']!r}); they compile on first use", flush=True)
        if "slice" in self.errors:
            raise RuntimeError("building the slice or its expert store failed") from self.errors["slice"]
        return self.path


def stand_in_profile(hardware: HardwareProfile, gpu_bytes: int) -> HardwareProfile:
    """The rehearsal's plan: the CPU standing in for the GPU, with the GPU budget as its memory,
    copies and reads at the measured RAM bandwidth and matmuls at the measured bf16 rate."""
    bf16_rate = hardware.cpu.dense_gweights_per_s["bf16"]["prefill"] * 1e9  # multiply-adds/s
    gpu = GPU(name="CPU stand-in", memory=gpu_bytes, h2d_bandwidth=hardware.cpu.ram_bandwidth,
              bf16_tflops=2 * bf16_rate / 1e12, memory_bandwidth=hardware.cpu.ram_bandwidth)
    return dataclasses.replace(hardware, name="detected-cpu-stand-in", gpu=gpu)


def graphed_decode_tok_s(engine, steps: int, capture: bool) -> tuple[float | None, str]:
    """Decode through `offload.graphs` (captured CUDA graphs; without CUDA the same code eagerly):
    (tok/s, what happened), None when graphs could not serve this engine."""
    reason = GraphedDecode.refusal(engine)
    if reason:
        return None, f"off: {reason}"
    engine.graphs = GraphedDecode(engine, capture=capture)
    try:
        rate = decode_tok_s(engine, steps)
        if capture and engine.graphs is None:
            return None, "the capture failed (see the note above); eager steps were timed"
        return rate, f"{len(engine.graphs.chains)} span(s) captured" if capture else "device positions, eagerly"
    finally:
        engine.graphs = None


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


def batched_decode_tok_s(engine, steps: int) -> float:
    """Aggregate tok/s of SEQUENCES sequences decoding together: one `Engine.step` advances each
    by a token (the server's continuous batching), after a 16-token prompt each."""
    for slot in range(SEQUENCES):
        engine.select(slot)
        engine.reset()
    engine.select(0)
    engine.step([(slot, list(range(1 + slot, 17 + slot))) for slot in range(SEQUENCES)])
    engine.step([(slot, [17]) for slot in range(SEQUENCES)])  # warm-up step
    times = []
    for i in range(steps):
        started = time.perf_counter()
        engine.step([(slot, [100 + i + slot]) for slot in range(SEQUENCES)])  # logits on the host: complete
        times.append(time.perf_counter() - started)
    return SEQUENCES / statistics.median(times)


def prefill_tok_s(engine, tokens: int) -> float:
    prompt = np.arange(tokens) % 1000 + 1
    best = float("inf")
    for _ in range(2):  # the first run also warms up (allocator, cuBLAS, pinned buffers)
        engine.reset()
        started = time.perf_counter()
        engine.feed(prompt, all_logits=False)
        best = min(best, time.perf_counter() - started)
    return tokens / best


def parse_options() -> argparse.Namespace:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="write the results as JSON here (default: $OUT/gpu.json when OUT is set)")
    parser.add_argument("--device", type=device_name, default="cuda",
                        help="cuda (default), cuda:N, or cpu (a rehearsal on the stand-in)")
    parser.add_argument("--gpu-mem", type=gib, default=8 * 2**30, help="the GPU budget in GiB (default 8)")
    parser.add_argument("--layers", type=positive_int, default=8)
    parser.add_argument("--experts", type=positive_int, default=128)
    parser.add_argument("--vocab", type=vocab_size, default=None,
                        help="the slice's vocabulary (default the real one, 151936; smaller for a quick rehearsal)")
    parser.add_argument("--steps", type=positive_int, default=32, help="decode steps timed")
    parser.add_argument("--prompts", type=prompt_lengths, default=[512, 2048], help="prompt lengths for prefill")
    parser.add_argument("--budget", type=seconds, default=480.0,
                        help="seconds in all: later phases are skipped (default 480)")
    parser.add_argument("--skip-tests", action="store_true")
    return parser.parse_args()


def main() -> int:
    options = parse_options()
    out = options.out or (Path(os.environ["OUT"]) / "gpu.json" if os.environ.get("OUT") else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        log = open(out.with_suffix(".log"), "w", buffering=1)
        sys.stdout, sys.stderr = Tee(sys.stdout, log), Tee(sys.stderr, log)
    device = torch.device(options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: CUDA was asked for but torch sees no CUDA device (a CPU build of torch, or no driver); "
              "run on the CUDA machine, or pass --device cpu for a rehearsal", file=sys.stderr)
        return 1

    cores = int(THREADS["NUMBA_NUM_THREADS"][0])
    results: dict = {"cpu": cpu_description(), "torch": torch.__version__, "device": str(device),
                     "slice": {"layers": options.layers, "experts": options.experts, "vocab": options.vocab},
                     "threads": {name: value for name, (value, _) in THREADS.items()}}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        results["card"] = {"name": properties.name, "memory_gib": round(properties.total_memory / 2**30, 1)}
    print(f"card: {results.get('card', {}).get('name', 'none (CPU stand-in)')}; CPU: {results['cpu']['model']}, "
          f"{results['cpu']['cores']} threads on {results['cpu']['physical_cores']} cores, "
          f"{' '.join(results['cpu']['flags'])}")
    print("threads: " + ", ".join(f"{name}={value} ({'given' if given else 'set here'})"
                                  for name, (value, given) in THREADS.items())
          + f"; torch uses {torch.get_num_threads()}, Numba {cores}", flush=True)
    budgets, expected = phase_budgets(options.prompts, options.skip_tests)
    phases = Phases(budgets, options.budget, results, out)
    phases.table(expected)
    watchdog = threading.Timer(STARTED + options.budget + OVERRUN_SECONDS - time.perf_counter(), stop,
                               (phases, results, out))
    watchdog.daemon = True
    watchdog.start()

    preparation, path = Preparation(options.layers, options.experts, options.vocab, cores), None
    preparing = phases.begin("prepare")
    if preparing:
        preparation.start()
    reason = "--skip-tests" if options.skip_tests else tests_cannot_run()
    if reason:
        phases.skip("tests", reason)
    elif phases.begin("tests"):
        timeout = min(phases.budgets["tests"][0], options.budget - (time.perf_counter() - STARTED))
        results["tests"] = run_gpu_tests(timeout, out and out.with_name(f"{out.stem}-pytest.log"))
        phases.end("tests", results["tests"]["status"])
    if preparing:
        try:
            path = preparation.wait()
            status = "done"
        except RuntimeError:
            traceback.print_exc()
            path, status = None, "failed"
        results["prepare"] = {f"{name} ready s": value for name, value in preparation.seconds.items()}
        phases.end("prepare", status)

    def measure_machine() -> HardwareProfile:
        hardware = detect(progress=lambda line: print(f"  {line}", flush=True), quick=True)
        if device.type == "cpu" and hardware.gpu is None:
            hardware = stand_in_profile(hardware, options.gpu_mem)
        if out is not None:
            write_profile(hardware, out.with_name(f"{out.stem}-profile.yaml"), comment="bench/gpu.py, quick detection")
        results["profile"] = hardware.to_yaml_dict()
        return hardware

    hardware = phases.run("detect", measure_machine)
    ctx = max(options.prompts) + 64

    def load_both():
        hybrid = offload.load(path, quant="int4", gpu_mem=options.gpu_mem, profile=hardware, device=str(device),
                              ctx=ctx, prefill="cpu", slots=SEQUENCES)
        plan = hybrid.plan
        results["plan"] = {"gpu_bytes": plan.gpu_bytes, "predicted_decode_tok_s": plan.predicted.decode_tok_s,
                           "decode_bound": plan.predicted.decode_bound,
                           "stream_from_tokens": plan.predicted.stream_from_tokens}
        results["placement"] = hybrid.placement
        cpu_only = offload.load(path, quant="int4", gpu_mem=0, profile=hardware, ctx=ctx, prefill="cpu",
                                slots=SEQUENCES)
        return hybrid, cpu_only

    hybrid, cpu_only = phases.run("load", load_both, needs=("prepare", "detect")) or (None, None)
    decode: dict = results.setdefault("decode_tok_s", {})  # filled as measured: a failure keeps the rest

    def measure_decode() -> None:
        executor = hybrid.executor
        decode["hybrid"] = decode_tok_s(hybrid, options.steps)
        executor.concurrent = False
        try:
            decode["hybrid, serialised"] = decode_tok_s(hybrid, options.steps)
        finally:
            executor.concurrent = True
        decode["cpu-only"] = decode_tok_s(cpu_only, options.steps)
        decode[f"hybrid, {SEQUENCES} sequences together"] = batched_decode_tok_s(hybrid, options.steps)
        decode[f"cpu-only, {SEQUENCES} sequences together"] = batched_decode_tok_s(cpu_only, options.steps)
        rate, how = graphed_decode_tok_s(hybrid, options.steps, capture=device.type == "cuda")
        results["cuda_graphs"] = how
        if rate is not None:
            decode["hybrid, CUDA graphs" if device.type == "cuda" else "hybrid, graph path (eager)"] = rate

    phases.run("decode", measure_decode, needs=("load",))
    prefill: dict = results.setdefault("prefill_tok_s", {})

    def measure_prefill(tokens: int) -> None:
        row = prefill[tokens] = {}
        hybrid.prefill, hybrid.pipelined = "cpu", True
        row["(a) pipelined"] = prefill_tok_s(hybrid, tokens)
        hybrid.pipelined = False
        row["(a)"] = prefill_tok_s(hybrid, tokens)
        hybrid.prefill = "stream"
        row["(b) streamed"] = prefill_tok_s(hybrid, tokens)
        if hardware.gpu is not None:  # every layer's experts over the bus once: the bound
            row["(b) copy bound"] = tokens * hardware.gpu.h2d_bandwidth / hybrid.executor.store.nbytes
        row["cpu-only"] = prefill_tok_s(cpu_only, tokens)

    for tokens in options.prompts:
        phases.run(f"prefill {tokens}", lambda: measure_prefill(tokens), needs=("load",))
    if hybrid is not None:
        hybrid.prefill, hybrid.pipelined = "auto", device.type == "cuda"
        results["peak_device_bytes"] = hybrid.gpu_peak_bytes
    report(results, options, device)
    watchdog.cancel()
    results["seconds"] = round(time.perf_counter() - STARTED, 1)
    save(results, out)
    if out is not None:
        print(f"wrote {out}")
    failed = [name for name, record in results["phases"].items() if record["status"] in ("failed", "timed out")]
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


def report(results: dict, options: argparse.Namespace, device: torch.device) -> None:
    """The figures measured, and their ratios against the targets."""
    decode, prefill, plan = results["decode_tok_s"], results["prefill_tok_s"], results.get("plan")
    peak = results.get("peak_device_bytes")

    def ratio(numerator: float | None, denominator: float | None) -> float | None:
        return numerator / denominator if numerator and denominator else None

    longest = prefill.get(max(options.prompts), {})
    ratios = {"hybrid decode vs CPU-only": ratio(decode.get("hybrid"), decode.get("cpu-only")),
              "concurrency (hybrid vs serialised decode)": ratio(decode.get("hybrid"), decode.get("hybrid, serialised")),
              "streamed prefill vs CPU prefill (a), longest prompt": ratio(longest.get("(b) streamed"), longest.get("(a)")),
              "pipelined vs plain prefill (a), longest prompt": ratio(longest.get("(a) pipelined"), longest.get("(a)")),
              "streamed prefill vs its copy bound, longest prompt": ratio(longest.get("(b) streamed"),
                                                                          longest.get("(b) copy bound")),
              "CUDA graphs vs eager hybrid decode": ratio(decode.get("hybrid, CUDA graphs"), decode.get("hybrid")),
              f"hybrid decode, {SEQUENCES} sequences together vs one":
                  ratio(decode.get(f"hybrid, {SEQUENCES} sequences together"), decode.get("hybrid")),
              f"CPU-only decode, {SEQUENCES} sequences together vs one":
                  ratio(decode.get(f"cpu-only, {SEQUENCES} sequences together"), decode.get("cpu-only")),
              "peak device memory vs plan": ratio(peak, plan and plan["gpu_bytes"]) if device.type == "cuda" else None,
              "predicted decode vs measured": None}
    if plan and decode.get("hybrid"):
        ratios["predicted decode vs measured"] = plan["predicted_decode_tok_s"] / decode["hybrid"] - 1
    results["ratios"] = ratios

    where = torch_device_name(device)
    print(f"\nQwen3-Next slice, {options.layers} layers x {options.experts} experts; GPU share on {where}, "
          f"routed experts on {results['cpu']['physical_cores']} CPU cores")
    for name, value in decode.items():
        print(f"  decode {name:<32} {value:8.1f} tok/s")
    if results.get("cuda_graphs"):
        print(f"  CUDA graphs: {results['cuda_graphs']}")
    for tokens, row in prefill.items():
        print(f"  prefill {tokens:>5}: " + ", ".join(f"{name} {value:.0f}" for name, value in row.items()) + " tok/s")
    if plan:
        print(f"  plan: decode {plan['predicted_decode_tok_s']:.1f} tok/s ({plan['decode_bound']}); "
              f"GPU {plan['gpu_bytes'] / 2**30:.2f} GiB, peak {(peak or 0) / 2**30:.2f} GiB")
    for name, value in ratios.items():
        target = TARGETS.get(name)
        predicted = name.startswith("predicted")
        shown = "n/a" if value is None else f"{value:+.0%}" if predicted else f"{value:.2f}x"
        goal = (f"   (target ±{target:.0%})" if predicted else
                f"   (target {'≤' if 'memory' in name else '≥'} {target}x)" if target else "")
        print(f"  {name:<55} {shown:>8}{goal}")


def stop(phases: Phases, results: dict, out: Path | None) -> None:
    """The watchdog: past the budget and its overrun, record where the run was and end it."""
    running = [name for name, record in phases.records.items() if record["status"] == "running"]
    print(f"\nstopped: {phases.total + OVERRUN_SECONDS:.0f} s have passed (--budget {phases.total:.0f} s "
          f"+ {OVERRUN_SECONDS} s), in {', '.join(running) or 'no phase'}", flush=True)
    for process in list(CHILDREN):
        kill_group(process)
    for name in running:
        phases.records[name]["status"] = "stopped"
    results["stopped"] = f"over budget, in {', '.join(running) or 'no phase'}"
    try:
        save(results, out)
    except (RuntimeError, OSError):  # the main thread was changing the results: the last save stands
        pass
    sys.stdout.flush()
    os._exit(1)


if __name__ == "__main__":
    sys.exit(main())
