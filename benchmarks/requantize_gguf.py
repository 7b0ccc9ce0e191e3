"""Requantise the embedded SmolLM2-135M-Instruct Q4_1 GGUF into other llama.cpp file types
(Q4_K_M, Q6_K, ...) with llama-cpp-python's llama_model_quantize, to benchmark the other
formats' kernels end to end (`bench_latency.py --dtypes auto --gguf OUT`). Needs the
optional llama-cpp-python install; the weights pass through Q4_1 first, so the files serve
speed and parity checks, not quality. SmolLM2's 576-wide rows are not multiples of 256, so a
Q4_K_M file holds mostly q5_0 (llama.cpp's fallback) beside q4_k / q6_k / q8_0.

    python benchmarks/requantize_gguf.py q4_k_m /tmp/smollm2-q4_k_m.gguf
"""
from __future__ import annotations

import argparse
import ctypes
from collections import Counter

FILE_TYPES = ("q4_k_m", "q5_k_m", "q6_k", "q8_0", "q5_0")


def requantize(file_type: str, out: str) -> Counter:
    """Write `out` and return how many tensors of each GGML type it holds."""
    import llama_cpp
    from gguf import GGUFReader

    from lmarith.embedded import find_embedded_gguf

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{file_type.upper()}")
    params.allow_requantize = True
    status = llama_cpp.llama_model_quantize(str(find_embedded_gguf()).encode(), out.encode(),
                                            ctypes.byref(params))
    if status != 0:
        raise SystemExit(f"llama_model_quantize failed with status {status}")
    return Counter(tensor.tensor_type.name for tensor in GGUFReader(out).tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("file_type", choices=FILE_TYPES)
    parser.add_argument("out", help="path of the GGUF file to write")
    args = parser.parse_args()
    print(dict(requantize(args.file_type, args.out)))


if __name__ == "__main__":
    main()
