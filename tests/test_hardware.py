"""Hardware profiles: the shipped YAML files, units as people write them, and clear errors."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner

from offload.cli import main
from offload.hardware import (ProfileError, load_profile, parse_rate, parse_size, profile_from_dict,
                              shipped_profiles)

VALID = {"name": "box", "gpu": {"name": "GPU", "memory": "8GiB", "h2d_bandwidth": "25 GB/s", "bf16_tflops": 30,
                                "memory_bandwidth": "272 GB/s"},
         "cpu": {"physical_cores": 8, "threads": 8, "ram": "64G", "ram_bandwidth": "60 GB/s"},
         "disk": {"read_bandwidth": "3 GB/s"}}


def test_every_shipped_profile_validates():
    names = shipped_profiles()
    assert len(names) >= 6 and "cpu-only-2core" in names
    kinds = {load_profile(name).gpu is None for name in names}
    assert kinds == {True, False}  # CPU-only and GPU boxes
    for name in names:
        profile = load_profile(name)
        assert profile.cpu.ram > 2**30 and profile.cpu.ram_bandwidth > 1e9


def test_units_as_people_write_them():
    assert parse_size("8G") == parse_size("8GiB") == parse_size("8 GB") == 8 * 2**30
    assert parse_size("512MiB") == 512 * 2**20 and parse_size(1024) == 1024
    assert parse_rate("25 GB/s") == parse_rate("25GB/s") == 25e9
    assert parse_rate("1 GiB/s") == 2**30


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["gpu"].update(memroy="8G"), r"box.yaml.gpu: unknown key 'memroy'; expected name, memory"),
    (lambda d: d["gpu"].update(memory="8 GB/s"), r"gpu.memory: '8 GB/s' is a rate, not a size"),
    (lambda d: d["cpu"].update(ram="lots"), r"cpu.ram: 'lots' is not a size; write e.g. 8GiB"),
    (lambda d: d["cpu"].update(ram_bandwidth="60 GB"), r"cpu.ram_bandwidth: expected a rate like '25 GB/s'"),
    (lambda d: d["cpu"].update(ram="-8G"), r"cpu.ram: must not be negative"),
    (lambda d: d["gpu"].update(bf16_tflops=-1), r"gpu.bf16_tflops: expected a positive number"),
    (lambda d: d["cpu"].update(physical_cores=0), r"cpu.physical_cores: expected a positive whole number"),
    (lambda d: d.pop("cpu"), r"box.yaml.cpu: missing"),
    (lambda d: d.update(tpu={}), r"unknown key 'tpu'"),
    (lambda d: d["cpu"].update(dense_gweights_per_s={"int5": {"decode": 1, "prefill": 2}}),
     r"cpu.dense_gweights_per_s: unknown format 'int5'; expected int4, int6, int8, bf16"),
    (lambda d: d["cpu"].update(dense_gweights_per_s={"int4": {"decode": 1}}),
     r"cpu.dense_gweights_per_s.int4.prefill: missing"),
    (lambda d: d["cpu"].update(dense_gweights_per_s={"int4": {"decode": "fast", "prefill": 2}}),
     r"cpu.dense_gweights_per_s.int4.decode: expected a positive number"),
])
def test_bad_profiles_are_explained(tmp_path, edit, message):
    data = yaml.safe_load(yaml.safe_dump(VALID))
    edit(data)
    path = tmp_path / "box.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ProfileError, match=message):
        load_profile(path)


def test_bad_yaml_and_unknown_names(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("cpu: [unclosed\n")
    with pytest.raises(ProfileError, match=r"broken.yaml: not valid YAML at line \d"):
        load_profile(path)
    with pytest.raises(ProfileError, match=r"no profile named 'rtx9090'; shipped profiles: .*cpu-only-2core"):
        load_profile("rtx9090")
    assert profile_from_dict(VALID).gpu.memory == 8 * 2**30


def test_profile_detect_writes_a_valid_profile(tmp_path):
    out = tmp_path / "me.yaml"
    result = CliRunner().invoke(main, ["profile", "detect", "--quick", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "RAM read bandwidth" in result.stderr and "int4 expert kernels" in result.stderr
    measured = load_profile(out)
    assert measured.cpu.ram_bandwidth > 1e9 and measured.cpu.int4_gweights_per_s > 0.5
    assert measured.cpu.physical_cores >= 1
    assert out.read_text().startswith("# Measured by `offload profile detect`")
    rates = measured.cpu.dense_gweights_per_s
    assert set(rates) == {"int4", "int6", "int8", "bf16"} and "dense matrices by format" in result.stderr
    assert all(r["decode"] > 0 and r["prefill"] > 0 for r in rates.values())
    # our kernels reuse each weight 512 times in a chunk; torch's bf16 matmul on a CPU without bf16
    # instructions widens every weight at each use, so its chunk may be barely faster (AVX2: 9 vs 10)
    assert all(rates[fmt]["decode"] < rates[fmt]["prefill"] for fmt in ("int4", "int6", "int8"))


def test_measured_dense_rates_drive_the_prediction():
    """The plan predicts CPU decode from the profile's measured dense rates when it has them:
    a CPU whose int4 dense kernel is slow makes the same plan slower."""
    from dataclasses import replace

    from offload.config import args_from_dict
    from offload.planner import make_plan
    from offload.synthetic import PRESETS

    args = args_from_dict(PRESETS["qwen3-30b-a3b"])
    base = load_profile("cpu-only-2core")
    measured = {fmt: {"decode": 40.0, "prefill": 300.0} for fmt in ("int4", "int6", "int8", "bf16")}
    fast = replace(base, cpu=replace(base.cpu, dense_gweights_per_s=measured))
    slow = replace(base, cpu=replace(base.cpu, dense_gweights_per_s={**measured, "int4": {"decode": 2.0,
                                                                                          "prefill": 10.0}}))
    plans = [make_plan(args, profile, 0, prompt_tokens=512) for profile in (base, fast, slow)]
    assert plans[2].predicted.decode_tok_s < plans[1].predicted.decode_tok_s
    assert plans[2].predicted.prefill_tok_s < plans[1].predicted.prefill_tok_s
    assert "measured decode int4 40" in plans[1].notes[-1] and "measured" not in plans[0].notes[-1]
    assert load_profile_round_trip(fast).cpu.dense_gweights_per_s == measured


def load_profile_round_trip(profile):
    return profile_from_dict(profile.to_yaml_dict())
