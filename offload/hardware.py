"""Hardware profiles: what a machine can do, read from YAML (`profiles/*.yaml`) or measured.

A profile names the GPU (memory, pinned host-to-device bandwidth, bf16 TFLOP/s, memory
bandwidth) or none, the CPU (physical cores, threads to use, RAM size and read bandwidth, and
the measured int4 expert throughput when known) and the disk's read bandwidth. Sizes and rates
are written the way people write them: `8GiB`, `8G` (binary, like GPU labels), `25 GB/s`
(decimal, like datasheets).
"""

from __future__ import annotations

import functools
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from offload.errors import OffloadError
from offload.paths import config_root


def _profiles_dir() -> Path:
    """The shipped profiles: the source tree's profiles/ (editable installs), else the copy a
    regular install puts under <prefix>/share/offload/profiles."""
    source = Path(__file__).resolve().parent.parent / "profiles"
    return source if source.is_dir() else Path(sys.prefix) / "share" / "offload" / "profiles"


PROFILES_DIR = _profiles_dir()


class ProfileError(OffloadError):
    """A hardware profile that cannot be read or does not make sense."""


@dataclass(frozen=True)
class GPU:
    name: str
    memory: int  # bytes
    h2d_bandwidth: float  # bytes/s, pinned host memory to device
    bf16_tflops: float  # dense bf16 matmul, TFLOP/s
    memory_bandwidth: float  # bytes/s


@dataclass(frozen=True)
class CPU:
    physical_cores: int
    threads: int  # threads the expert kernels use
    ram: int  # bytes
    ram_bandwidth: float  # bytes/s, all threads reading
    int4_gweights_per_s: float | None = None  # kernels' measured decode throughput, if known
    # measured dense matrix rates, G weights/s: format ("int4", "int6", "int8", "bf16") ->
    # {"decode": one token from RAM, "prefill": a 512-token chunk}, if known
    dense_gweights_per_s: dict[str, dict[str, float]] | None = None


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    cpu: CPU
    gpu: GPU | None = None
    disk_bandwidth: float = 2e9  # bytes/s

    def to_yaml_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.gpu:
            out["gpu"] = {"name": self.gpu.name, "memory": format_size(self.gpu.memory),
                          "h2d_bandwidth": format_rate(self.gpu.h2d_bandwidth),
                          "bf16_tflops": round(self.gpu.bf16_tflops, 1),
                          "memory_bandwidth": format_rate(self.gpu.memory_bandwidth)}
        out["cpu"] = {"physical_cores": self.cpu.physical_cores, "threads": self.cpu.threads,
                      "ram": format_size(self.cpu.ram), "ram_bandwidth": format_rate(self.cpu.ram_bandwidth)}
        if self.cpu.int4_gweights_per_s is not None:
            out["cpu"]["int4_gweights_per_s"] = round(self.cpu.int4_gweights_per_s, 1)
        if self.cpu.dense_gweights_per_s:
            out["cpu"]["dense_gweights_per_s"] = {fmt: {phase: round(rate, 1) for phase, rate in rates.items()}
                                                  for fmt, rates in self.cpu.dense_gweights_per_s.items()}
        out["disk"] = {"read_bandwidth": format_rate(self.disk_bandwidth)}
        return out


SIZE_PATTERN = re.compile(r"^\s*\d+(\.\d*)?\s*([kmgtpe](i?b)?|b|bytes?)?\s*$", re.IGNORECASE)


def parse_size(text: str | int | float, what: str = "size") -> int:
    """'8G', '8GiB', '8 GB', 8589934592 -> bytes (G, GB and GiB all mean 2^30, as on GPU labels)."""
    if isinstance(text, bool):
        raise ProfileError(f"{what}: expected a size like 8GiB, got {text!r}")
    if isinstance(text, (int, float)):
        value = int(text)
    else:
        if "/s" in str(text):
            raise ProfileError(f"{what}: {text!r} is a rate, not a size; write e.g. 8GiB")
        if str(text).strip().startswith("-"):
            raise ProfileError(f"{what}: must not be negative, got {text!r}")
        if not SIZE_PATTERN.match(str(text)):  # humanfriendly reads "8 bananas" as 8 bytes
            raise ProfileError(f"{what}: {text!r} is not a size; write e.g. 8GiB, 8G or 512MiB")
        import humanfriendly  # here, not at the top: `import offload` and byte counts do without it

        try:
            value = int(humanfriendly.parse_size(str(text), binary=True))
        except humanfriendly.InvalidSize:
            raise ProfileError(f"{what}: {text!r} is not a size; write e.g. 8GiB, 8G or 512MiB") from None
    if value < 0:
        raise ProfileError(f"{what}: must not be negative, got {text!r}")
    return value


def parse_rate(text: str | int | float, what: str = "bandwidth") -> float:
    """'25 GB/s', '25GB/s', '12.5 GiB/s' -> bytes/s (GB decimal, GiB binary, as datasheets)."""
    if isinstance(text, bool) or not isinstance(text, str) or not text.strip().endswith("/s"):
        raise ProfileError(f"{what}: expected a rate like '25 GB/s', got {text!r}")
    if text.strip().startswith("-"):
        raise ProfileError(f"{what}: must be positive, got {text!r}")
    import humanfriendly

    try:
        value = float(humanfriendly.parse_size(text.strip()[:-2].strip()))
    except humanfriendly.InvalidSize:
        raise ProfileError(f"{what}: {text!r} is not a rate; write e.g. '25 GB/s'") from None
    if value <= 0:
        raise ProfileError(f"{what}: must be positive, got {text!r}")
    return value


def format_size(nbytes: float) -> str:
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:.1f}GiB"
    if nbytes >= 2**20 or nbytes == 0:
        return f"{nbytes / 2**20:.0f}MiB"
    return f"{nbytes / 2**10:.0f}KiB"


def format_rate(bytes_per_s: float) -> str:
    return f"{bytes_per_s / 1e9:.1f} GB/s"


_GPU_KEYS = {"name": "text", "memory": "size", "h2d_bandwidth": "rate", "bf16_tflops": "number",
             "memory_bandwidth": "rate"}
_CPU_KEYS = {"physical_cores": "count", "threads": "count", "ram": "size", "ram_bandwidth": "rate",
             "int4_gweights_per_s": "optional number", "dense_gweights_per_s": "optional dense rates"}
DENSE_RATE_FORMATS = ("int4", "int6", "int8", "bf16")
DENSE_RATE_PHASES = ("decode", "prefill")
_DISK_KEYS = {"read_bandwidth": "rate"}


def _section(data: Any, keys: dict[str, str], where: str) -> dict[str, Any]:
    """Validate one mapping of a profile against `keys` (name -> kind); returns parsed values."""
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: expected a mapping of keys, got {type(data).__name__}")
    unknown = sorted(set(data) - set(keys))
    if unknown:
        raise ProfileError(f"{where}: unknown key {unknown[0]!r}; expected {', '.join(keys)}")
    out: dict[str, Any] = {}
    for key, kind in keys.items():
        label, value = f"{where}.{key}", data.get(key)
        if value is None:
            if kind.startswith("optional"):
                continue
            raise ProfileError(f"{label}: missing")
        if kind == "size":
            out[key] = parse_size(value, label)
        elif kind == "rate":
            out[key] = parse_rate(value, label)
        elif kind.endswith("dense rates"):
            out[key] = _dense_rates(value, label)
        elif kind.endswith("number"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ProfileError(f"{label}: expected a positive number, got {value!r}")
            out[key] = float(value)
        elif kind == "count":
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ProfileError(f"{label}: expected a positive whole number, got {value!r}")
            out[key] = value
        else:
            out[key] = str(value)
    return out


def _dense_rates(data: Any, where: str) -> dict[str, dict[str, float]]:
    """format -> {decode, prefill} in G weights/s, e.g. {int4: {decode: 30, prefill: 350}}."""
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: expected a mapping of formats ({', '.join(DENSE_RATE_FORMATS)}) to "
                           "{decode: G weights/s, prefill: G weights/s}")
    rates = {}
    for fmt, phases in data.items():
        if fmt not in DENSE_RATE_FORMATS:
            raise ProfileError(f"{where}: unknown format {fmt!r}; expected {', '.join(DENSE_RATE_FORMATS)}")
        keys = dict.fromkeys(DENSE_RATE_PHASES, "number")
        rates[fmt] = _section(phases, keys, f"{where}.{fmt}")
    return rates


def profile_from_dict(data: Any, where: str = "profile") -> HardwareProfile:
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: expected a mapping with name, cpu, gpu and disk")
    unknown = sorted(set(data) - {"name", "cpu", "gpu", "disk"})
    if unknown:
        raise ProfileError(f"{where}: unknown key {unknown[0]!r}; expected name, cpu, gpu, disk")
    if data.get("cpu") is None:
        raise ProfileError(f"{where}.cpu: missing")
    cpu = CPU(**_section(data["cpu"], _CPU_KEYS, f"{where}.cpu"))
    if cpu.threads > 2 * cpu.physical_cores:
        raise ProfileError(f"{where}.cpu.threads: {cpu.threads} threads for {cpu.physical_cores} cores")
    gpu = GPU(**_section(data["gpu"], _GPU_KEYS, f"{where}.gpu")) if data.get("gpu") is not None else None
    disk = _section(data.get("disk") or {"read_bandwidth": "2 GB/s"}, _DISK_KEYS, f"{where}.disk")
    return HardwareProfile(name=str(data.get("name") or where), cpu=cpu, gpu=gpu,
                           disk_bandwidth=disk["read_bandwidth"])


def load_profile(name_or_path: str | Path) -> HardwareProfile:
    """A profile by file path, or by the name of a shipped profile (`profiles/<name>.yaml`)."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = PROFILES_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ProfileError(f"no profile named {str(name_or_path)!r}; shipped profiles: "
                               f"{', '.join(shipped_profiles())}, or give a YAML file")
    if not path.is_file():
        raise ProfileError(f"{path}: no such profile file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise ProfileError(f"{path}: not valid YAML{line}; fix the file or run `offload profile detect`") from None
    return profile_from_dict(data, where=path.name)


def shipped_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def write_profile(profile: HardwareProfile, path: Path, comment: str = "") -> None:
    """Write atomically (temp file + rename)."""
    text = "".join(f"# {line}\n" for line in comment.splitlines()) + yaml.safe_dump(
        profile.to_yaml_dict(), sort_keys=False)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(text)
    temp.replace(path)


DEFAULT_PROFILE_PATH = config_root() / "profile.yaml"
REFERENCE_PROFILE = "rtx4060-ddr5"  # the box offload is built for: an 8 GB GPU and a lot of RAM


def default_profile() -> tuple[HardwareProfile, str]:
    """This machine's profile if `offload profile detect` saved one, else the reference box."""
    if DEFAULT_PROFILE_PATH.is_file():
        return load_profile(DEFAULT_PROFILE_PATH), f"{DEFAULT_PROFILE_PATH} (detected)"
    return load_profile(REFERENCE_PROFILE), (f"{REFERENCE_PROFILE}, the reference box; run "
                                             "`offload profile detect` to plan for this machine")


def cpu_model() -> str:
    """The processor's model name, as benchmark records state it."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def detect(progress=print, quick: bool = False) -> HardwareProfile:
    """Measure this machine: cores, RAM and its read bandwidth, the int4 kernels' decode rate,
    dense matrices' decode and prefill rates in each format, and the GPU (memory, pinned host-to-device bandwidth, memory bandwidth, bf16 matmul rate).

    quick: 256 MiB probes instead of 4 GiB; fast, but they measure caches more than RAM."""
    import numpy as np
    import psutil

    from offload.kernels.membw import read_bandwidth
    from offload.kernels.probe import decode_throughput, dense_throughput, pool_for
    from offload.kernels.threads import physical_cores

    cores = physical_cores()
    ram = psutil.virtual_memory().total
    probe_bytes = min(256 * 2**20 if quick else 4 * 2**30, psutil.virtual_memory().available // 4)
    progress(f"RAM read bandwidth ({probe_bytes / 2**30:.1f} GiB, {cores} threads) ...")
    values = np.ones(probe_bytes // 4, np.float32)
    bandwidth = read_bandwidth(values, cores)
    del values
    progress(f"  {bandwidth / 1e9:.1f} GB/s")
    progress("int4 expert kernels, decode batch 1 (Qwen3-Next expert shape; compiles on first use) ...")
    gate_up, down = pool_for(2048, 512, min(2 * 2**30, probe_bytes // 2), minimum_experts=64)
    int4_rate = decode_throughput(gate_up, down, batch=1, top_k=10, calls=10 if quick else 40) / 1e9
    del gate_up, down
    progress(f"  {int4_rate:.1f} G weights/s")
    progress("dense matrices by format: decode (1 token, from RAM) and prefill (512 tokens) ...")
    dense = {}
    for fmt in DENSE_RATE_FORMATS:
        measure = _bf16_throughput if fmt == "bf16" else functools.partial(dense_throughput, fmt)
        dense[fmt] = {"decode": measure(1, probe_bytes // 2, calls=10 if quick else 40) / 1e9,
                      "prefill": measure(512, 64 * 2**20, calls=2 if quick else 4) / 1e9}
        progress(f"  {fmt}: {dense[fmt]['decode']:.1f} / {dense[fmt]['prefill']:.1f} G weights/s")
    gpu = _detect_gpu(progress)
    name = f"detected-{'cpu-only' if gpu is None else gpu.name.split()[-1].lower()}"
    cpu = CPU(physical_cores=cores, threads=cores, ram=ram, ram_bandwidth=bandwidth, int4_gweights_per_s=int4_rate,
              dense_gweights_per_s=dense)
    return HardwareProfile(name=name, cpu=cpu, gpu=gpu)


def _bf16_throughput(tokens: int, pool_bytes: int, calls: int) -> float:
    """`kernels.probe.dense_throughput` for a bf16 matrix through torch (the path of dense
    matrices kept as stored)."""
    import numpy as np
    import torch

    from offload.kernels.probe import DENSE_SHAPE, pool_rate

    rng = np.random.default_rng(0)
    first = torch.from_numpy(rng.standard_normal(DENSE_SHAPE, dtype=np.float32) * 0.02).to(torch.bfloat16)
    pool = [first.clone() for _ in range(max(1, pool_bytes // (first.numel() * 2)))]
    x = torch.from_numpy(rng.standard_normal((tokens, DENSE_SHAPE[1]), dtype=np.float32)).to(torch.bfloat16)
    return pool_rate(pool, lambda matrix: torch.nn.functional.linear(x, matrix), tokens * first.numel(), calls)


def _detect_gpu(progress) -> GPU | None:
    import torch

    if not torch.cuda.is_available():
        progress("GPU: none (torch sees no CUDA device)")
        return None
    import time

    device = torch.device("cuda")
    properties = torch.cuda.get_device_properties(device)
    progress(f"GPU: {properties.name}, {properties.total_memory / 2**30:.1f} GiB; measuring ...")

    def timed(run, repeats: int = 5) -> float:
        run()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeats

    host = torch.empty(256 * 2**20, dtype=torch.uint8, pin_memory=True)
    target = torch.empty_like(host, device=device)
    h2d = host.numel() / timed(lambda: target.copy_(host, non_blocking=True))
    source = torch.empty(2**30, dtype=torch.uint8, device=device)
    copy = torch.empty_like(source)
    memory_bandwidth = 2 * source.numel() / timed(lambda: copy.copy_(source))
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    tflops = 2 * 8192**3 / timed(lambda: a @ a) / 1e12
    progress(f"  host-to-device {h2d / 1e9:.1f} GB/s, memory {memory_bandwidth / 1e9:.0f} GB/s, "
             f"bf16 {tflops:.0f} TFLOP/s")
    del host, target, source, copy, a
    torch.cuda.empty_cache()  # the probes' 2.3 GiB would otherwise stay reserved against a later load's cap
    return GPU(name=properties.name, memory=properties.total_memory, h2d_bandwidth=h2d,
               bf16_tflops=tflops, memory_bandwidth=memory_bandwidth)
