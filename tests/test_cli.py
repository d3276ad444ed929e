"""The `offload` command line, driven through click's runner."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import offload
from offload.cli import main


@pytest.fixture
def runner(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path / "cache"))
    return CliRunner()


def test_run_demo_builds_the_demo_once_and_generates(runner, tmp_path):
    result = runner.invoke(main, ["run", "--demo", "--max-tokens", "5", "--ids", "1 2 3", "--json"])
    assert result.exit_code == 0, result.output
    assert "Building the demo model" in result.stderr
    record = json.loads(result.stdout)
    assert record["prompt_tokens"] == 3 and 1 <= record["generated_tokens"] <= 5
    assert record["generated_tokens"] == 5 or record["finish_reason"] == "stop"
    again = runner.invoke(main, ["run", "--demo", "--max-tokens", "5", "--ids", "1,2,3", "--json"])
    assert again.exit_code == 0 and "Building" not in again.stderr
    assert json.loads(again.stdout)["token_ids"] == record["token_ids"]  # greedy is deterministic


def test_run_model_dir(runner, tmp_path):
    out = tmp_path / "tiny"
    synth = runner.invoke(main, ["synth", "tiny-qwen3-moe", str(out), "--layers", "2"])
    assert synth.exit_code == 0, synth.output
    assert "wrote" in synth.stdout and json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    result = runner.invoke(main, ["run", "--model", str(out), "--max-tokens", "3", "--ids", "5 6 7",
                                  "--temperature", "0", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["token_ids"] == offload.load(out, quant="int4").generate([5, 6, 7], max_new_tokens=3)


def test_run_verbose_shows_where_each_group_runs(runner, tmp_path):
    out = tmp_path / "tiny"
    assert runner.invoke(main, ["synth", "tiny-qwen3-next", str(out)]).exit_code == 0
    result = runner.invoke(main, ["run", "--model", str(out), "--ids", "5 6 7", "--max-tokens", "2", "-v",
                                  "--gpu-mem", "8G", "--device", "cpu", "--profile", "rtx4060-ddr5"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.stderr.splitlines() if line.startswith("  ")}
    assert rows["mixers"][1:3] == ["cpu", "(GPU)"] and rows["routed"][3] == "int4"
    assert "standing in for a GPU" in result.stderr
    if not torch.cuda.is_available():
        cuda = runner.invoke(main, ["run", "--model", str(out), "--ids", "5 6 7", "--device", "cuda"])
        assert cuda.exit_code == 1 and cuda.stderr.count("error:") == 1 and "no CUDA device" in cuda.stderr


@pytest.mark.parametrize("args, message", [
    (["run", "--model", "/no/such/dir", "-p", "hi"], "error: /no/such/dir does not exist"),
    (["synth", "gpt5", "out"], "error: unknown preset 'gpt5'"),
])
def test_errors_are_one_line_without_traceback(runner, args, message):
    result = runner.invoke(main, args)
    assert result.exit_code == 1
    assert result.stderr.strip().startswith(message)
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_run_needs_a_model(runner):
    result = runner.invoke(main, ["run"])
    assert result.exit_code == 2 and "give exactly one of --model DIR or --demo" in result.stderr
    result = runner.invoke(main, ["run", "--demo", "--ids", "a b"])
    assert result.exit_code == 2 and "is not a list of token ids" in result.stderr


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "offload", "--help"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "synth" in result.stdout and "run" in result.stdout


def test_ctrl_c_leaves_no_traceback_and_no_partial_output(tmp_path):
    import signal
    import time

    out = tmp_path / "big"
    process = subprocess.Popen([sys.executable, "-m", "offload", "synth", "qwen3-30b-a3b",
                                str(out), "--layers", "6"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".big.partial-*")) and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not out.exists() and not list(tmp_path.glob(".big.partial-*"))
