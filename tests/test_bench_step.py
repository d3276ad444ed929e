"""bench/step.py rehearsed on a small slice: every kernel family it times shows up in real decode
steps, and what is left between them is what the step takes beyond them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def profile(tmp_path, *options: str) -> tuple[str, float, dict, dict]:
    """bench/step.py's output on a 4-layer slice, the timed step, its rows (ms, share) and calls."""
    env = {**os.environ, "OFFLOAD_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "bench/step.py", "--layers", "4", "--experts", "16", "--vocab", "4096",
                          "--steps", "4", "--runs", "1", *options],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    out = run.stdout
    step = float(re.search(r"one timed run: ([\d.]+) ms a step", out).group(1))
    rows = {name.strip(): (float(ms), share) for name, ms, share in
            re.findall(r"^  (\w[\w ]+?)\s+([\d.]+)\s+(?:\d+\s+)?(\d+)%$", out, re.M)}
    calls = dict(re.findall(r"^  (\w[\w ]+?)\s+[\d.]+\s+(\d+)\s+\d+%$", out, re.M))
    return out, step, rows, calls


def test_the_step_profile_accounts_for_the_step(tmp_path):
    out, step, rows, calls = profile(tmp_path)
    assert re.search(r"decode step [\d.]+ ms \([\d.]+ tok/s\), \d+% of the bound", out)
    assert {"dense kernels", "output head", "expert kernels", "DeltaNet kernel", "attention kernel",
            "between kernels"} <= set(rows)
    assert all(ms > 0 for ms, _ in rows.values()) and rows["between kernels"][0] < step
    # calls a step: 4 layers (3 DeltaNet, 1 attention), each with a MoE block, then the head once
    assert (calls["expert kernels"], calls["DeltaNet kernel"], calls["attention kernel"], calls["output head"]) \
        == ("4", "3", "1", "1")

    # two conversations a step: the rows share the matrices and the experts' calls, and each has
    # its own mixers' state
    out, step, rows, calls = profile(tmp_path, "--rows", "2")
    assert re.search(r"decode step of 2 rows [\d.]+ ms \([\d.]+ tok/s together\)", out)
    assert rows["between kernels"][0] < step
    assert (calls["expert kernels"], calls["DeltaNet kernel"], calls["attention kernel"], calls["output head"]) \
        == ("4", "6", "2", "1")
