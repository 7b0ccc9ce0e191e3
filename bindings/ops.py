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
spec_accept(target [B,K+1,V], draft [B,K,V], draft_tokens [B,K], num_drafts, seed, step, greedy [B])
    -> (num_accepted [B] int32, next_token [B] int64)      semantics: kernels/reference_speculative.py
"""
from __future__ import annotations

import functools
import importlib
from typing import Callable

import torch

from lmarith.bindings import checks, cpp
from lmarith.kernels import reference, reference_attention, reference_speculative

__all__ = ["combine", "sample", "store_kv", "paged_attention", "spec_accept", "filtered_log_probs", "run", "faces", "face_for",
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
    "store_kv": {"torch": reference_attention.store_kv, "triton": _triton("store_kv", "store_kv")},
    "paged_attention": {"torch": reference_attention.paged_attention,
                        "triton": _triton("paged_attention", "paged_attention")},
    "spec_accept": {"torch": reference_speculative.spec_accept,
                    "triton": _triton("spec_accept", "spec_accept"),
                    "cpp": lambda *args: cpp.spec_accept(*args)},
}
_CHECKS = {"combine": checks.validate_combine, "sample": checks.validate_sample,
           "store_kv": checks.validate_store_kv, "paged_attention": checks.validate_paged_attention,
           "spec_accept": checks.validate_spec_accept}


def cpp_available() -> bool:
    """True when the C++ extension lmarith._C imported."""
    return cpp.available()


def faces(op: str) -> list[str]:
    """The faces of an op this build can run ("cpp" only when lmarith._C imported)."""
    return [name for name in _FACES[op] if name != "cpp" or cpp.available()]


def face_for(op: str, device: torch.device) -> str:
    """The face the dispatch picks for inputs on this device."""
    if device.type == "cuda":
        return "triton"
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


def combine_cpp(*args) -> tuple[torch.Tensor, torch.Tensor]:
    """The C++ face of combine on CPU tensors; raises if lmarith._C is missing."""
    return run("combine", "cpp", *args)


def sample_cpp(*args) -> torch.Tensor:
    """The C++ face of sample on CPU tensors; raises if lmarith._C is missing."""
    return run("sample", "cpp", *args)
