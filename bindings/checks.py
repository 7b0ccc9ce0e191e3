"""Input checks shared by every face of every op: shapes, dtypes and devices are checked once
here, before any kernel sees a pointer, with messages that say what to change. Keyword
options of one face (Triton tile sizes) pass through unchecked."""
from __future__ import annotations

import torch

from lmarith.kernels.quant_formats import QuantWeight
from lmarith.kernels.reference_bf16 import BF16Weight
from lmarith.kernels.reference_f32 import F32Weight

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _check_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(tensor.shape)}")


def _check_dtype(name: str, tensor: torch.Tensor, allowed: tuple[torch.dtype, ...], kind: str) -> None:
    if tensor.dtype not in allowed:
        raise ValueError(f"{name} must be {kind} tensor, got {tensor.dtype}; convert it with .to(...)")


def _check_same_device(tensors: dict[str, torch.Tensor]) -> torch.device:
    """All inputs must live on one device, which is returned."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    strays = [f"{name} on {device}" for name, device in devices.items() if device != first]
    if strays:
        raise ValueError(f"all inputs must be on one device (first is {first}); move "
                         + ", ".join(strays))
    return first


def _check_tensors(tensors: dict[str, object]) -> None:
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def validate_combine(logits: torch.Tensor, weights: torch.Tensor, consts: torch.Tensor,
                      group_coefs: torch.Tensor, group_kinds: torch.Tensor,
                      mask_weights: torch.Tensor | None = None,
                      mask_log_alpha: torch.Tensor | None = None, **face_options) -> torch.device:
    """Checks the plan's shapes against logits [T, B, V]; returns the common device."""
    named = {"logits": logits, "weights": weights, "consts": consts,
             "group_coefs": group_coefs, "group_kinds": group_kinds}
    _check_tensors(named)
    if logits.dim() != 3:
        raise ValueError(f"logits must be [T, B, V], got shape {list(logits.shape)}")
    num_terms, batch, vocab = logits.shape
    if vocab == 0:
        raise ValueError("logits must have a nonempty vocabulary (V > 0)")
    if group_coefs.dim() != 2:
        raise ValueError(f"group_coefs must be [B, G], got shape {list(group_coefs.shape)}")
    num_groups = group_coefs.shape[1]
    num_blocks = 1 + 2 * num_groups
    _check_shape("weights", weights, (batch, num_blocks, num_terms))
    _check_shape("consts", consts, (batch, num_blocks))
    _check_shape("group_coefs", group_coefs, (batch, num_groups))
    _check_shape("group_kinds", group_kinds, (batch, num_groups))
    _check_dtype("logits", logits, _FLOAT_DTYPES, "a floating-point")
    for name in ("weights", "consts", "group_coefs"):
        _check_dtype(name, named[name], _FLOAT_DTYPES, "a floating-point")
    _check_dtype("group_kinds", group_kinds, _INT_DTYPES, "an integer")
    named.update(_checked_mask(mask_weights, mask_log_alpha, batch, num_terms))
    return _check_same_device(named)


def _checked_mask(mask_weights, mask_log_alpha, batch: int, num_terms: int) -> dict:
    """The plausibility mask inputs, both or neither: mask_weights [B, T], mask_log_alpha [B]."""
    if mask_weights is None and mask_log_alpha is None:
        return {}
    if mask_weights is None or mask_log_alpha is None:
        raise ValueError("mask_weights and mask_log_alpha go together: pass both (a plausibility "
                         "mask; mask_log_alpha -inf leaves a row unmasked) or neither")
    named = {"mask_weights": mask_weights, "mask_log_alpha": mask_log_alpha}
    _check_tensors(named)
    _check_shape("mask_weights", mask_weights, (batch, num_terms))
    _check_shape("mask_log_alpha", mask_log_alpha, (batch,))
    for name, tensor in named.items():
        _check_dtype(name, tensor, _FLOAT_DTYPES, "a floating-point")
    return named


def validate_sample(log_probs: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                     top_p: torch.Tensor, min_p: torch.Tensor, seed: torch.Tensor,
                     step: torch.Tensor, **face_options) -> torch.device:
    """Checks log_probs [B, V] and the per-row [B] controls; returns the common device."""
    named = {"log_probs": log_probs, "temperature": temperature, "top_k": top_k,
             "top_p": top_p, "min_p": min_p, "seed": seed, "step": step}
    _check_tensors(named)
    if log_probs.dim() != 2:
        raise ValueError(f"log_probs must be [B, V], got shape {list(log_probs.shape)}")
    batch, vocab = log_probs.shape
    if vocab == 0:
        raise ValueError("log_probs must have a nonempty vocabulary (V > 0)")
    if vocab >= 2 ** 31:
        raise ValueError(f"the vocabulary must be below 2**31 tokens, got {vocab}")
    _check_dtype("log_probs", log_probs, _FLOAT_DTYPES, "a floating-point")
    for name in ("temperature", "top_p", "min_p"):
        _check_shape(name, named[name], (batch,))
        _check_dtype(name, named[name], _FLOAT_DTYPES, "a floating-point")
    for name in ("top_k", "seed", "step"):
        _check_shape(name, named[name], (batch,))
        _check_dtype(name, named[name], _INT_DTYPES, "an integer")
    return _check_same_device(named)


def validate_store_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_pages: torch.Tensor,
                      slot_offsets: torch.Tensor, **face_options) -> torch.device:
    """key/value [N, KVH, D] against caches [P, page_size, KVH, D] and slots [N]."""
    named = {"key": key, "value": value, "key_cache": key_cache, "value_cache": value_cache,
             "slot_pages": slot_pages, "slot_offsets": slot_offsets}
    _check_tensors(named)
    if key.dim() != 3 or key.shape != value.shape:
        raise ValueError(f"key/value must both be [N, KVH, D], got {list(key.shape)} and "
                         f"{list(value.shape)}")
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(f"caches must both be [P, page_size, KVH, D], got {list(key_cache.shape)} "
                         f"and {list(value_cache.shape)}")
    if key_cache.shape[2:] != key.shape[1:]:
        raise ValueError(f"cache heads/dim {list(key_cache.shape[2:])} != key {list(key.shape[1:])}")
    _check_shape("slot_pages", slot_pages, (key.shape[0],))
    _check_shape("slot_offsets", slot_offsets, (key.shape[0],))
    return _check_same_device(named)


def validate_paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                             meta, scale: float, sliding_window: int | None = None,
                             **face_options) -> torch.device:
    """query [N, H, D] against caches [P, page_size, KVH, D] and the step's metadata."""
    named = {"query": query, "key_cache": key_cache, "value_cache": value_cache,
             "block_tables": meta.block_tables, "context_lens": meta.context_lens}
    _check_tensors(named)
    if query.dim() != 3:
        raise ValueError(f"query must be [N, H, D], got {list(query.shape)}")
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(f"caches must both be [P, page_size, KVH, D], got {list(key_cache.shape)} "
                         f"and {list(value_cache.shape)}")
    if key_cache.shape[1] != meta.page_size:
        raise ValueError(f"cache page size {key_cache.shape[1]} != meta.page_size {meta.page_size}")
    if key_cache.shape[3] != query.shape[2]:
        raise ValueError(f"head_dim mismatch: query {query.shape[2]}, cache {key_cache.shape[3]}")
    if query.shape[1] % key_cache.shape[2] != 0:
        raise ValueError(f"{query.shape[1]} query heads are not a multiple of "
                         f"{key_cache.shape[2]} kv heads")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"sliding_window must be None or a positive integer, got {sliding_window!r}")
    if query.shape[0] != meta.slot_pages.shape[0]:
        raise ValueError(f"query has {query.shape[0]} rows but the metadata "
                         f"{meta.slot_pages.shape[0]} tokens")
    return _check_same_device(named)


def validate_spec_accept(target_log_probs: torch.Tensor, draft_log_probs: torch.Tensor,
                         draft_tokens: torch.Tensor, num_drafts: torch.Tensor, seed: torch.Tensor,
                         step: torch.Tensor, greedy: torch.Tensor, **face_options) -> torch.device:
    """target [B, K+1, V] and draft [B, K, V] log-probs, tokens [B, K], per-row [B] controls."""
    named = {"target_log_probs": target_log_probs, "draft_log_probs": draft_log_probs,
             "draft_tokens": draft_tokens, "num_drafts": num_drafts, "seed": seed, "step": step,
             "greedy": greedy}
    _check_tensors(named)
    if target_log_probs.dim() != 3 or target_log_probs.shape[1] < 1:
        raise ValueError(f"target_log_probs must be [B, K+1, V], got {list(target_log_probs.shape)}")
    batch, positions, vocab = target_log_probs.shape
    if vocab == 0 or vocab >= 2 ** 31:
        raise ValueError(f"the vocabulary must have 1 to 2**31 - 1 tokens, got {vocab}")
    _check_shape("draft_log_probs", draft_log_probs, (batch, positions - 1, vocab))
    _check_shape("draft_tokens", draft_tokens, (batch, positions - 1))
    for name in ("target_log_probs", "draft_log_probs"):
        _check_dtype(name, named[name], _FLOAT_DTYPES, "a floating-point")
    _check_dtype("draft_tokens", draft_tokens, _INT_DTYPES, "an integer")
    for name in ("num_drafts", "seed", "step"):
        _check_shape(name, named[name], (batch,))
        _check_dtype(name, named[name], _INT_DTYPES, "an integer")
    _check_shape("greedy", greedy, (batch,))
    _check_dtype("greedy", greedy, (torch.bool,), "a bool")
    device = _check_same_device(named)
    if batch and positions > 1 and ((draft_tokens < 0) | (draft_tokens >= vocab)).any():
        raise ValueError(f"draft_tokens must lie in [0, {vocab})")
    if batch and ((num_drafts < 0) | (num_drafts > positions - 1)).any():
        raise ValueError(f"num_drafts must lie in [0, {positions - 1}] (K)")
    return device


def validate_quant_matmul(x: torch.Tensor, weight: QuantWeight, **face_options) -> torch.device:
    """x [M, K] float32/bfloat16 against a QuantWeight [N, K] on the same device."""
    if not isinstance(weight, QuantWeight):
        raise ValueError(f"weight must be a lmarith.kernels.quant_formats.QuantWeight, got "
                         f"{type(weight).__name__}; quantize it with ops.quantize_q8_0 or load "
                         "it from a GGUF file")
    _check_tensors({"x": x})
    if x.dim() != 2:
        raise ValueError(f"x must be [M, K], got shape {list(x.shape)}; flatten the leading dims "
                         "with x.reshape(-1, K)")
    if x.shape[1] != weight.in_features:
        raise ValueError(f"x has K = {x.shape[1]} columns but the weight's in_features is "
                         f"{weight.in_features}")
    _check_dtype("x", x, (torch.float32, torch.bfloat16), "a float32 or bfloat16")
    return _check_same_device({"x": x, "weight.data": weight.data})


def _validate_packed_linear(x: torch.Tensor, weight, kind: type, pack: str,
                            x_dtypes: tuple, x_kind: str, bias: torch.Tensor | None) -> torch.device:
    """x [M, K] of x_dtypes, a packed weight of type kind [N, K] and bias [N] (or None) on
    one device; returns that device."""
    if not isinstance(weight, kind):
        raise ValueError(f"weight must be a {kind.__module__}.{kind.__name__}, got "
                         f"{type(weight).__name__}; pack it with ops.{pack}(w)")
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != weight.in_features:
        shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor [M, {weight.in_features}], got {shape}")
    _check_dtype("x", x, x_dtypes, x_kind)
    tensors = {"x": x, "weight.data": weight.data}
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.out_features,):
            raise ValueError(f"bias must be a tensor [{weight.out_features}] or None")
        tensors["bias"] = bias
    return _check_same_device(tensors)


def validate_bf16_linear(x: torch.Tensor, weight: BF16Weight, bias: torch.Tensor | None = None,
                         **face_options) -> torch.device:
    """x [M, K] float32/bfloat16, a packed BF16Weight [N, K] and bias [N] (or None)."""
    return _validate_packed_linear(x, weight, BF16Weight, "pack_bf16",
                                   (torch.float32, torch.bfloat16), "a float32 or bfloat16", bias)


def validate_f32_linear(x: torch.Tensor, weight: F32Weight, bias: torch.Tensor | None = None,
                        **face_options) -> torch.device:
    """x [M, K] float32, a packed F32Weight [N, K] (float32 panels) and bias [N] (or None)."""
    if isinstance(weight, F32Weight) and weight.data.dtype != torch.float32:
        raise ValueError(f"weight.data must be float32 panels, got {weight.data.dtype}; pack the "
                         "weight again with ops.pack_f32(w) instead of converting it")
    return _validate_packed_linear(x, weight, F32Weight, "pack_f32", (torch.float32,),
                                   "a float32", bias)


def validate_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                      residual: torch.Tensor | None = None, **face_options) -> torch.device:
    """x [..., H] float, weight [H] and residual (x's shape and dtype, or None) on one device."""
    tensors = {"x": x, "weight": weight} if residual is None else {"x": x, "weight": weight,
                                                                   "residual": residual}
    _check_tensors(tensors)
    _check_dtype("x", x, _FLOAT_DTYPES, "a floating-point")
    if x.dim() == 0 or tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(f"weight must be [{x.shape[-1] if x.dim() else 'H'}] for x "
                         f"{list(x.shape)}, got {list(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual must match x ({list(x.shape)}, {x.dtype}), got "
                         f"{list(residual.shape)}, {residual.dtype}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    return _check_same_device(tensors)


def validate_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    **face_options) -> torch.device:
    """x [N, heads, D] (D even) rotated in place by cos/sin [N, 1, D] in x's dtype."""
    tensors = {"x": x, "cos": cos, "sin": sin}
    _check_tensors(tensors)
    _check_dtype("x", x, _FLOAT_DTYPES, "a floating-point")
    if x.dim() != 3 or x.shape[2] % 2:
        raise ValueError(f"x must be [N, heads, D] with D even, got {list(x.shape)}")
    for name, table in (("cos", cos), ("sin", sin)):
        _check_shape(name, table, (x.shape[0], 1, x.shape[2]))
        if table.dtype != x.dtype:
            raise ValueError(f"{name} must be in x's dtype {x.dtype}, got {table.dtype}")
    return _check_same_device(tensors)


def validate_silu_mul(gate_up: torch.Tensor, **face_options) -> torch.device:
    """gate_up [..., 2I] float (gate then up)."""
    _check_tensors({"gate_up": gate_up})
    _check_dtype("gate_up", gate_up, _FLOAT_DTYPES, "a floating-point")
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up must be [..., 2I] (an even last axis), got {list(gate_up.shape)}")
    return gate_up.device
