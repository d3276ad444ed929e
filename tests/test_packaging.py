"""How offload installs: under its own name only (Hugging Face publishes a package named `kernels`
that transformers imports when present), and a wheel that works on its own."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_the_kernels_are_offloads_and_transformers_ignores_them():
    """offload's kernels are `offload.kernels` only: a top-level `kernels`, if any, is Hugging
    Face's package (recent transformers releases install it), never our directory."""
    import importlib.util

    import offload.kernels
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    assert Path(offload.kernels.__file__).parent.name == "kernels"
    top_level = importlib.util.find_spec("kernels")
    assert top_level is None or Path(top_level.origin).resolve().parent != ROOT / "kernels"
    config = Qwen3MoeConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4,
                            num_experts_per_tok=2, moe_intermediate_size=8)
    with torch.no_grad():
        logits = Qwen3MoeForCausalLM(config)(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 32)


def test_a_wheel_installs_only_offload_and_runs_on_its_own(tmp_path):
    """`pip wheel .`, installed into a fresh venv (its dependencies lent from this environment
    by a .pth file, so no download): `offload plan` finds its profiles and `offload chat --demo`
    answers, from a directory far from the source tree."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("offload-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.startswith("offload-")}
    assert tops == {"offload"}, tops  # no top-level cli or kernels
    assert "offload/kernels/q8.py" in names and "offload/cli.py" in names
    assert any(name.endswith("data/data/share/offload/profiles/rtx4060-ddr5.yaml") for name in names)

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "lent.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch, numba, ...
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True)
    offload = env_dir / "bin" / "offload"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OFFLOAD_CACHE": str(tmp_path / "cache"),
                                                                        "XDG_CONFIG_HOME": str(tmp_path / "config")}
    where = subprocess.run([python, "-c", "import offload.kernels, offload.cli; print(offload.kernels.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, check=True).stdout
    assert where.startswith(site)  # the installed copy, not the source tree
    plan = subprocess.run([offload, "plan", "--preset", "qwen3-30b-a3b", "--profile", "rtx4060-ddr5"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert plan.returncode == 0, plan.stderr
    assert "profile rtx4060-ddr5" in plan.stdout and "fits" in plan.stdout
    chat = subprocess.run([offload, "chat", "--demo", "--max-tokens", "4"], input="Hello there\n",
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip() and "loaded" in chat.stderr
