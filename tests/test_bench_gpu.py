"""bench/gpu.py rehearsed as the lent CUDA machine runs it: from the source tree, without the
packages that machine lacks, its results under $OUT. On the CPU stand-in, with a small slice
(~25 s on 2 cores once Numba's cache holds the kernels; a first run compiles them, ~1 min more)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# absent on the CUDA machine; the bench and everything it imports must do without them
MISSING = ("humanfriendly", "prompt_toolkit", "wcwidth", "fastapi", "uvicorn", "sse_starlette", "openai", "gguf",
           "pexpect", "hypothesis")
REHEARSAL = ["--device", "cpu", "--layers", "2", "--experts", "16", "--vocab", "4096", "--prompts", "64,600",
             "--skip-tests", "--steps", "4"]


def run_bench(tmp_path: Path, *arguments: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """bench/gpu.py in a fresh process whose `import humanfriendly` (and the rest of MISSING) fails,
    with its slice and expert store in a new cache and OUT set."""
    blocked = tmp_path / "blocked"
    blocked.mkdir(exist_ok=True)
    for name in MISSING:
        (blocked / f"{name}.py").write_text(f"raise ImportError('{name} is not installed on the CUDA machine')\n")
    env = {name: value for name, value in os.environ.items()
           if name not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS")}
    env |= {"PYTHONPATH": str(blocked), "OUT": str(tmp_path / "out"), "OFFLOAD_CACHE": str(tmp_path / "cache"),
            "XDG_CONFIG_HOME": str(tmp_path / "config")}
    return subprocess.run([sys.executable, "bench/gpu.py", *arguments], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


def test_the_rehearsal_measures_everything_and_writes_it_under_out(tmp_path):
    run = run_bench(tmp_path, *REHEARSAL)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "OMP_WAIT_POLICY=PASSIVE (set here)" in run.stdout
    table = run.stdout.split("phases (", 1)[1].split("== ", 1)[0]
    for phase in ("prepare", "tests", "detect", "load", "decode", "prefill 64", "prefill 600"):
        assert f"  {phase} " in table
    for phase in ("prepare", "detect", "load", "decode", "prefill 64", "prefill 600"):
        assert f"== {phase}: done in " in run.stdout

    results = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert {name: record["status"] for name, record in results["phases"].items()} == {
        "prepare": "done", "tests": "skipped", "detect": "done", "load": "done", "decode": "done",
        "prefill 64": "done", "prefill 600": "done"}
    assert set(results["decode_tok_s"]) == {"hybrid", "hybrid, serialised", "hybrid, graph path (eager)", "cpu-only",
                                            "hybrid, 4 sequences together", "cpu-only, 4 sequences together"}
    assert results["cuda_graphs"] == "device positions, eagerly"
    assert all(value > 0 for value in results["decode_tok_s"].values())
    assert set(results["prefill_tok_s"]) == {"64", "600"}
    for row in results["prefill_tok_s"].values():
        assert set(row) == {"(a) pipelined", "(a)", "(b) streamed", "(b) copy bound", "cpu-only"}
        assert all(value > 0 for value in row.values())
    assert results["plan"]["gpu_bytes"] > 0 and results["ratios"]["hybrid decode vs CPU-only"] > 0
    assert results["ratios"]["hybrid decode, 4 sequences together vs one"] > 0
    assert results["ratios"]["streamed prefill vs its copy bound, longest prompt"] > 0
    assert results["prepare"]["slice ready s"] <= results["prepare"]["int4 store ready s"]
    log = (tmp_path / "out" / "gpu.log").read_text()
    assert "== prefill 600: done" in log and "hybrid decode vs CPU-only" in log
    assert (tmp_path / "out" / "gpu-profile.yaml").is_file()
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_phases_past_the_budget_are_skipped_and_recorded(tmp_path):
    run = run_bench(tmp_path, *REHEARSAL, "--budget", "0.01", timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert {record["status"] for record in results["phases"].values()} == {"skipped"}
    assert "== detect: skipped, the 0 s budget is spent" in run.stdout
    assert not (tmp_path / "cache").exists()  # nothing was built


def test_bad_arguments_get_one_line_and_exit_2(tmp_path):
    for arguments in (["--prompts", "abc"], ["--prompts", "64,0"], ["--gpu-mem", "lots"]):
        run = run_bench(tmp_path, *arguments, timeout=120)
        assert run.returncode == 2, (arguments, run.stderr)
        assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr, run.stderr
        assert "error:" in run.stderr
