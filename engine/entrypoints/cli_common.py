"""Pieces shared by the `lmarith` subcommands: the flags naming models and sizing the engine,
and argparse value types that reject bad values with exit status 2 before anything loads."""
from __future__ import annotations

import argparse
import os
import re
from typing import Any

from lmarith.config import KV_CACHE_DTYPES
from lmarith.models.loading.progress import NO_PROGRESS_ENV

SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
DEVICES = ("cpu", "cuda")


class UsageError(Exception):
    """A command line that cannot run (e.g. benchmarks asked for outside a checkout)."""


def byte_size(text: str) -> int:
    """argparse type: a byte count, plain or with a binary unit (512M, 1G, 2GiB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; give bytes, e.g. 1073741824 or 1G")
    value = int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the size must be positive")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def port_number(text: str) -> int:
    """argparse type: a TCP port, 0..65535 (0: any free port)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is out of range 0..65535")
    return value


def quiet_parent() -> argparse.ArgumentParser:
    """The --quiet flag every subcommand takes."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("-q", "--quiet", action="store_true",
                        help=f"no progress bars (also: {NO_PROGRESS_ENV}=1); bars are drawn on "
                             "stderr only when it is a terminal")
    return parent


def add_model_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", action="append", default=[], metavar="NAME=PATH[:DTYPE]",
        help="a model a formula can name (repeatable): NAME=PATH, PATH a Hugging Face directory "
             "or a .gguf file, DTYPE float32 (default), bfloat16 or float16; the first one is "
             "the default model M(); none: the embedded SmolLM2-135M-Instruct as 'smollm2'")


def add_engine_flags(parser: argparse.ArgumentParser, max_num_seqs_default: int = 64) -> None:
    parser.add_argument("--kv-cache-bytes", type=byte_size, default=None, metavar="BYTES",
                        help="KV cache budget shared by every model, e.g. 512M or 2G "
                             "(default 1G)")
    parser.add_argument("--max-num-seqs", type=positive_int, default=max_num_seqs_default,
                        metavar="N", help=f"requests running at once (default {max_num_seqs_default})")
    parser.add_argument("--device", choices=DEVICES, default="cpu",
                        help="where the models run (default cpu)")
    parser.add_argument("--tensor-parallel-size", type=positive_int, default=1, metavar="N",
                        help="shard every model over N ranks: processes on CPU (gloo), one GPU "
                             "each on CUDA (NCCL); the KV budget is then per rank (default 1)")
    parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                        help="what the KV cache stores: auto (each model's dtype), float32 or "
                             "bfloat16 (half a float32 model's KV bytes; default auto)")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of la.LLM from the engine flags (unset ones keep LLM's defaults)."""
    kwargs: dict[str, Any] = {"max_num_seqs": args.max_num_seqs, "device": args.device,
                              "tensor_parallel_size": args.tensor_parallel_size,
                              "kv_cache_dtype": args.kv_cache_dtype}
    if args.kv_cache_bytes is not None:
        kwargs["kv_cache_bytes"] = args.kv_cache_bytes
    return kwargs


def apply_quiet(args: argparse.Namespace) -> None:
    """--quiet switches progress bars off here and in anything this process runs."""
    if getattr(args, "quiet", False):
        os.environ[NO_PROGRESS_ENV] = "1"
