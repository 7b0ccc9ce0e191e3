"""The one dispatch layer every model and decoder kernel call goes through.

Each op has faces with one signature: "torch" (lmarith.kernels.reference*, the
specification), "triton" (lmarith.kernels, for CUDA; the interpreter runs it on CPU tensors
in tests) and "cpp" (lmarith._C, for CPU, where it pays). Inputs are checked once here
(bindings/checks.py), then the face is chosen by device: CUDA -> triton, CPU -> cpp when the
op has one and the extension built, else torch. `run(op, face, ...)` calls one face by name
(tests, benchmarks); `faces(op)` lists those available in this build.

combine(logits [T,B,V], weights [B,R,T], consts [B,R], group_coefs [B,G], group_kinds [B,G],
        mask_weights [B,T] | None, mask_log_alpha [B] | None)
    -> (log_probs [B,V] f32, lse [B] f32)                         semantics: kernels/reference.py
    (the optional pair is the plausibility mask of a Plausible formula, both or neither;
    mask_log_alpha -inf leaves a row unmasked)
sample(log_probs [B,V], temperature, top_k, top_p, min_p, seed, step [B]) -> tokens [B] int64
store_kv(key, value [N,KVH,D], key_cache, value_cache [P,page,KVH,D], slot_pages, slot_offsets [N])
paged_attention(query [N,H,D], key_cache, value_cache, meta, scale, sliding_window) -> [N,H,D]
    (C++ face: csrc/paged_attention.cpp, K/V pages read in place through the block table)
spec_accept(target [B,K+1,V], draft [B,K,V], draft_tokens [B,K], num_drafts, seed, step, greedy [B])
    -> (num_accepted [B] int32, next_token [B] int64)      semantics: kernels/reference_speculative.py
quant_matmul(x [M,K] f32/bf16, weight: QuantWeight [N,K] in GGML blocks) -> [M,N] f32
    (x @ W.T; the C++ face quantises x per 32-block to int8)   semantics: kernels/reference_quant.py
dequantize(weight) -> [N,K] f32, quantize_q8_0(w [N,K]) -> QuantWeight     (torch face only)
rms_norm(x [..,H], weight [H], eps, residual | None) -> (weight * norm(x + residual), x + residual | None)
rotary(x [N,heads,D], cos, sin [N,1,D]) -> None (x rotated in place, rotate-half pairs)
silu_mul(gate_up [..,2I]) -> silu(gate) * up [..,I]      (the three: kernels/reference_layers.py;
    C++ faces: csrc/layer_ops.cpp, as is store_kv's; no Triton face, CUDA runs torch's)
bf16_linear(x [M,K] f32/bf16, weight: BF16Weight [N,K] packed bf16, bias [N] | None) -> [M,N] in
    x's dtype (x rounded to bf16, f32 sums; C++ face: csrc/bf16_matmul.cpp, AVX512-BF16 /
    AVX2 / scalar). No Triton face: on CUDA the torch face runs (F.linear, cuBLAS), and CUDA
    models keep nn.Linear's bf16 cuBLAS path.      semantics: kernels/reference_bf16.py
f32_linear(x [M,K] f32, weight: F32Weight [N,K] packed f32, bias [N] | None) -> [M,N] f32
    (C++ face: csrc/f32_matmul.cpp, AVX512F / AVX2 / scalar; CPU float32 models' linears;
    no Triton face, as bf16_linear)                semantics: kernels/reference_f32.py
"""
from __future__ import annotations

import contextlib
import functools
import importlib
from typing import Callable, Iterator

import torch

from lmarith.bindings import checks, cpp, cpp_bf16, cpp_f32, cpp_layers, cpp_quant
from lmarith.kernels import (reference, reference_attention, reference_bf16, reference_f32,
                             reference_layers, reference_quant, reference_speculative)
from lmarith.kernels.reference_bf16 import BF16Weight
from lmarith.kernels.reference_f32 import F32Weight
from lmarith.kernels.quant_formats import QuantWeight

__all__ = ["combine", "sample", "store_kv", "paged_attention", "spec_accept", "filtered_log_probs", "quant_matmul", "prepared_quant_matmul",
           "dequantize", "quantize_q8_0", "bf16_linear", "rms_norm", "rotary", "silu_mul", "prepared_bf16_linear", "pack_bf16",
           "f32_linear", "prepared_f32_linear", "pack_f32", "run", "faces", "face_for",
           "combine_cpp", "sample_cpp", "cpp_available"]


def _torch_combine(logits, weights, consts, group_coefs, group_kinds, mask_weights=None,
                   mask_log_alpha=None):
    mask = () if mask_weights is None else (mask_weights.float(), mask_log_alpha.float())
    return reference.combine(logits, weights.float(), consts.float(), group_coefs.float(),
                             group_kinds.to(torch.int32), *mask)


def _triton(module: str, name: str) -> Callable:
    """Import a Triton kernel module only when it is first used (it needs a driver or the
    interpreter switched on before import)."""
    def call(*args, **kwargs):
        return getattr(importlib.import_module(f"lmarith.kernels.{module}"), name)(*args, **kwargs)
    return call


_FACES: dict[str, dict[str, Callable]] = {
    "combine": {"torch": _torch_combine, "triton": _triton("combine", "combine"), "cpp": cpp.combine},
    "sample": {"torch": reference.sample, "triton": _triton("sample", "sample"), "cpp": cpp.sample},
    "store_kv": {"torch": reference_attention.store_kv, "triton": _triton("store_kv", "store_kv"),
                 "cpp": cpp_layers.store_kv},
    "paged_attention": {"torch": reference_attention.paged_attention,
                        "triton": _triton("paged_attention", "paged_attention"),
                        "cpp": cpp.paged_attention},
    "spec_accept": {"torch": reference_speculative.spec_accept,
                    "triton": _triton("spec_accept", "spec_accept"),
                    "cpp": lambda *args: cpp.spec_accept(*args)},
    "quant_matmul": {"torch": reference_quant.quant_matmul,
                     "triton": _triton("quant_matmul", "quant_matmul"),
                     "cpp": cpp_quant.quant_matmul},
    "bf16_linear": {"torch": reference_bf16.bf16_linear, "cpp": cpp_bf16.bf16_linear},
    "f32_linear": {"torch": reference_f32.f32_linear, "cpp": cpp_f32.f32_linear},
    "rms_norm": {"torch": reference_layers.rms_norm, "cpp": cpp_layers.rms_norm},
    "rotary": {"torch": reference_layers.rotary, "cpp": cpp_layers.rotary},
    "silu_mul": {"torch": reference_layers.silu_mul, "cpp": cpp_layers.silu_mul},
}
_CHECKS = {"combine": checks.validate_combine, "sample": checks.validate_sample,
           "store_kv": checks.validate_store_kv, "paged_attention": checks.validate_paged_attention,
           "spec_accept": checks.validate_spec_accept,
           "quant_matmul": checks.validate_quant_matmul, "bf16_linear": checks.validate_bf16_linear,
           "f32_linear": checks.validate_f32_linear,
           "rms_norm": checks.validate_rms_norm, "rotary": checks.validate_rotary,
           "silu_mul": checks.validate_silu_mul}


def cpp_available() -> bool:
    """True when the C++ extension lmarith._C imported."""
    return cpp.available()


def faces(op: str) -> list[str]:
    """The faces of an op this build can run ("cpp" only when lmarith._C imported)."""
    return [name for name in _FACES[op] if name != "cpp" or cpp.available()]


def face_for(op: str, device: torch.device) -> str:
    """The face the dispatch picks for inputs on this device."""
    if device.type == "cuda":
        return "triton" if "triton" in _FACES[op] else "torch"
    if device.type == "cpu" and "cpp" in faces(op):
        return "cpp"
    return "torch"


def run(op: str, face: str, *args, **kwargs):
    """Check the inputs, then run one named face of an op."""
    if face not in _FACES[op]:
        raise ValueError(f"op {op!r} has no {face!r} face; it has {', '.join(_FACES[op])}")
    device = _CHECKS[op](*args, **kwargs)
    if face == "cpp":
        cpp.require(device, f"{op} (cpp)")
    return _FACES[op][face](*args, **kwargs)


@functools.lru_cache(maxsize=None)
def _face_by_type(op: str, device_type: str, with_cpp: bool) -> Callable:
    return _FACES[op][face_for(op, torch.device(device_type))]


@contextlib.contextmanager
def forced_face(op: str, face: str) -> Iterator[None]:
    """Within the block the dispatch runs `face` for `op` wherever it would run another (a
    benchmark comparing faces inside one engine run); the faces are restored after."""
    saved = dict(_FACES[op])
    _FACES[op].update(dict.fromkeys(saved, saved[face]))
    _face_by_type.cache_clear()
    try:
        yield
    finally:
        _FACES[op].update(saved)
        _face_by_type.cache_clear()


def _dispatch(op: str, device: torch.device) -> Callable:
    """The face for inputs on this device (looked up once per op, device type and build)."""
    return _face_by_type(op, device.type, cpp.available())


def combine(logits: torch.Tensor, weights: torch.Tensor, consts: torch.Tensor,
            group_coefs: torch.Tensor, group_kinds: torch.Tensor,
            mask_weights: torch.Tensor | None = None, mask_log_alpha: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluate formula plans on stacked logits [T, B, V] -> (log_probs [B, V], lse [B]);
    mask_weights/mask_log_alpha: the optional plausibility mask (stack_plans gives them)."""
    args = (logits, weights, consts, group_coefs, group_kinds, mask_weights, mask_log_alpha)
    device = checks.validate_combine(*args)
    return _dispatch("combine", device)(*args)


def sample(log_probs: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, min_p: torch.Tensor, seed: torch.Tensor,
           step: torch.Tensor) -> torch.Tensor:
    """Draw one token per row of log_probs [B, V] -> int64 [B], reproducibly per (seed, step)."""
    device = checks.validate_sample(log_probs, temperature, top_k, top_p, min_p, seed, step)
    return _dispatch("sample", device)(log_probs, temperature, top_k, top_p, min_p, seed, step)


def store_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
             value_cache: torch.Tensor, slot_pages: torch.Tensor, slot_offsets: torch.Tensor) -> None:
    """Write this step's K/V into their (page, offset) slots of the paged cache, in place."""
    device = checks.validate_store_kv(key, value, key_cache, value_cache, slot_pages, slot_offsets)
    _dispatch("store_kv", device)(key, value, key_cache, value_cache, slot_pages, slot_offsets)


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    meta, scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention of this step's queries over their sequences' paged K/V."""
    device = checks.validate_paged_attention(query, key_cache, value_cache, meta, scale, sliding_window)
    return _dispatch("paged_attention", device)(query, key_cache, value_cache, meta, scale,
                                                sliding_window)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight * rmsnorm(s), s) with s = x + residual, or (weight * rmsnorm(x), None): the
    residual add and norm of a pre-norm block in one op."""
    device = checks.validate_rms_norm(x, weight, eps, residual)
    return _dispatch("rms_norm", device)(x, weight, eps, residual)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate-half rotary embedding of x [N, heads, D] in place (cos/sin [N, 1, D])."""
    device = checks.validate_rotary(x, cos, sin)
    _dispatch("rotary", device)(x, cos, sin)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a fused gate/up projection's output [..., 2I] -> [..., I]."""
    device = checks.validate_silu_mul(gate_up)
    return _dispatch("silu_mul", device)(gate_up)


def spec_accept(target_log_probs: torch.Tensor, draft_log_probs: torch.Tensor,
                draft_tokens: torch.Tensor, num_drafts: torch.Tensor, seed: torch.Tensor,
                step: torch.Tensor, greedy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify each row's proposals exactly -> (accepted counts [B], corrected/bonus token [B])."""
    args = (target_log_probs, draft_log_probs, draft_tokens, num_drafts, seed, step, greedy)
    device = checks.validate_spec_accept(*args)
    return _dispatch("spec_accept", device)(*args)


def filtered_log_probs(log_probs: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                       top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """The law `sample` draws from, as log-probs [B, V] (greedy rows unfiltered): what
    speculative verification compares. One face (torch): it is sorts and softmaxes."""
    zeros = torch.zeros_like(temperature, dtype=torch.int64)
    checks.validate_sample(log_probs, temperature, top_k, top_p, min_p, zeros, zeros)
    return reference.filtered_log_probs(log_probs, temperature, top_k, top_p, min_p)


def quant_matmul(x: torch.Tensor, weight: QuantWeight) -> torch.Tensor:
    """y [M, N] float32 = x [M, K] @ W.T for a GGML-quantized weight, never dequantised to a
    float matrix on CPU (int8 dot products) nor written back dequantised on CUDA."""
    device = checks.validate_quant_matmul(x, weight)
    return _dispatch("quant_matmul", device)(x, weight)


def prepared_quant_matmul(weight: QuantWeight) -> Callable[[torch.Tensor], torch.Tensor]:
    """quant_matmul bound to one weight, checked here once (a model layer's fixed weight):
    the returned call(x [M, K]) checks only that x has K columns, then runs the face."""
    checks.validate_quant_matmul(torch.empty(0, weight.in_features, device=weight.data.device), weight)
    face = _dispatch("quant_matmul", weight.data.device)
    call = cpp_quant.prepared(weight) if face is cpp_quant.quant_matmul else (lambda x: face(x, weight))

    def checked(x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != weight.in_features:
            raise ValueError(f"x must be [M, {weight.in_features}], got {list(x.shape)}")
        return call(x)
    return checked


def dequantize(weight: QuantWeight) -> torch.Tensor:
    """The float32 matrix [N, K] a QuantWeight stands for (torch face, on its device)."""
    if not isinstance(weight, QuantWeight):
        raise ValueError(f"weight must be a QuantWeight, got {type(weight).__name__}")
    return reference_quant.dequantize(weight)


def quantize_q8_0(w: torch.Tensor) -> QuantWeight:
    """ggml's q8_0 of a float matrix [N, K], K % 32 == 0 (torch face, on w's device)."""
    checks._check_tensors({"w": w})
    if w.dim() != 2 or w.shape[1] % 32:
        raise ValueError(f"w must be [N, K] with K divisible by 32, got {list(w.shape)}")
    checks._check_dtype("w", w, checks._FLOAT_DTYPES, "a floating-point")
    return reference_quant.quantize_q8_0(w)


def combine_cpp(*args) -> tuple[torch.Tensor, torch.Tensor]:
    """The C++ face of combine on CPU tensors; raises if lmarith._C is missing."""
    return run("combine", "cpp", *args)


def sample_cpp(*args) -> torch.Tensor:
    """The C++ face of sample on CPU tensors; raises if lmarith._C is missing."""
    return run("sample", "cpp", *args)


def _check_matrix(w: torch.Tensor) -> None:
    checks._check_tensors({"w": w})
    if w.dim() != 2 or 0 in w.shape:
        raise ValueError(f"w must be a nonempty [N, K] matrix, got {list(w.shape)}")
    checks._check_dtype("w", w, checks._FLOAT_DTYPES, "a floating-point")


def pack_bf16(w: torch.Tensor) -> BF16Weight:
    """A float matrix [N, K] rounded to bfloat16 in bf16_linear's packed layout (once, at load)."""
    _check_matrix(w)
    return reference_bf16.pack_weight(w)


def pack_f32(w: torch.Tensor) -> F32Weight:
    """A float matrix [N, K] as float32 in f32_linear's packed layout (once, at load)."""
    _check_matrix(w)
    return reference_f32.pack_weight(w)


def bf16_linear(x: torch.Tensor, weight: BF16Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W.T + bias for a packed bf16 weight, in x's dtype (x rounded to
    bf16, float32 sums): on CPU the C++ kernel reads half the bytes of a float32 matmul."""
    device = checks.validate_bf16_linear(x, weight, bias)
    return _dispatch("bf16_linear", device)(x, weight, bias)


def f32_linear(x: torch.Tensor, weight: F32Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W.T + bias for a packed float32 weight: on CPU the C++ kernel
    streams a decode GEMV's weight at the memory's rate."""
    device = checks.validate_f32_linear(x, weight, bias)
    return _dispatch("f32_linear", device)(x, weight, bias)


def _prepared_linear(op: str, weight, bias: torch.Tensor | None, cpp_module
                     ) -> Callable[[torch.Tensor], torch.Tensor]:
    """A packed linear op bound to one weight and bias, checked here once (a model layer's):
    the returned call(x [M, K]) checks only that x has K columns, then runs the face."""
    device = _CHECKS[op](torch.empty(0, weight.in_features, device=weight.data.device), weight, bias)
    face = _dispatch(op, device)
    call = cpp_module.prepared(weight, bias) if face is getattr(cpp_module, op) else (
        lambda x: face(x, weight, bias))

    def checked(x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != weight.in_features:
            raise ValueError(f"x must be [M, {weight.in_features}], got {list(x.shape)}")
        return call(x)
    return checked


def prepared_bf16_linear(weight: BF16Weight, bias: torch.Tensor | None = None
                         ) -> Callable[[torch.Tensor], torch.Tensor]:
    """bf16_linear bound to one weight and bias (see _prepared_linear)."""
    return _prepared_linear("bf16_linear", weight, bias, cpp_bf16)


def prepared_f32_linear(weight: F32Weight, bias: torch.Tensor | None = None
                        ) -> Callable[[torch.Tensor], torch.Tensor]:
    """f32_linear bound to one weight and bias (see _prepared_linear)."""
    return _prepared_linear("f32_linear", weight, bias, cpp_f32)
