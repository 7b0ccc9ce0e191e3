"""Public faces of lmarith's kernels: `combine` and `sample`, dispatched by device.

CUDA tensors go to the Triton kernels (`lmarith.kernels.combine` / `.sample`), CPU tensors
to the C++ kernels in `lmarith._C` (or to `lmarith.kernels.reference` when the extension
failed to import), anything else to the reference. Semantics: kernels/reference.py.
"""
from __future__ import annotations

import torch

from lmarith.kernels import reference

try:
    from lmarith import _C
except ImportError as error:  # a broken build still leaves the reference usable
    _C = None
    _C_IMPORT_ERROR: ImportError | None = error
else:
    _C_IMPORT_ERROR = None

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_LOGITS_F32, _LOGITS_BF16 = 0, 1

__all__ = ["combine", "sample", "combine_cpp", "sample_cpp", "cpp_available"]


def cpp_available() -> bool:
    """True when the C++ extension lmarith._C imported."""
    return _C is not None


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


def _validate_combine(logits: torch.Tensor, weights: torch.Tensor, consts: torch.Tensor,
                      group_coefs: torch.Tensor, group_kinds: torch.Tensor) -> torch.device:
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
    return _check_same_device(named)


def _validate_sample(log_probs: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                     top_p: torch.Tensor, min_p: torch.Tensor, seed: torch.Tensor,
                     step: torch.Tensor) -> torch.device:
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


def _contiguous(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype).contiguous()


def _require_cpp(device: torch.device, face: str) -> None:
    if _C is None:
        raise RuntimeError(f"{face}: lmarith._C is not available ({_C_IMPORT_ERROR}); "
                           "rebuild with `pip install --no-build-isolation -e .`")
    if device.type != "cpu":
        raise ValueError(f"{face} runs on CPU tensors only, got {device}; move them with .cpu()")


def _combine_cpp_unchecked(logits: torch.Tensor, weights: torch.Tensor, consts: torch.Tensor,
                           group_coefs: torch.Tensor, group_kinds: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs lmarith._C.combine on validated CPU inputs (bf16 logits pass as raw bits)."""
    num_terms, batch, vocab = logits.shape
    num_groups = group_coefs.shape[1]
    if logits.dtype == torch.bfloat16:
        logits, logits_code = logits.contiguous(), _LOGITS_BF16
    else:
        logits, logits_code = _contiguous(logits, torch.float32), _LOGITS_F32
    weights = _contiguous(weights, torch.float32)
    consts = _contiguous(consts, torch.float32)
    group_coefs = _contiguous(group_coefs, torch.float32)
    group_kinds = _contiguous(group_kinds, torch.int32)
    log_probs = torch.empty((batch, vocab), dtype=torch.float32)
    lse = torch.empty((batch,), dtype=torch.float32)
    _C.combine(logits.data_ptr(), logits_code, num_terms, batch, vocab, weights.data_ptr(),
               consts.data_ptr(), 1 + 2 * num_groups, group_coefs.data_ptr(),
               group_kinds.data_ptr(), num_groups, log_probs.data_ptr(), lse.data_ptr())
    return log_probs, lse


def _sample_cpp_unchecked(log_probs: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                          top_p: torch.Tensor, min_p: torch.Tensor, seed: torch.Tensor,
                          step: torch.Tensor) -> torch.Tensor:
    """Runs lmarith._C.sample on validated CPU inputs."""
    batch, vocab = log_probs.shape
    log_probs = _contiguous(log_probs, torch.float32)
    temperature = _contiguous(temperature, torch.float32)
    top_k = _contiguous(top_k.to(torch.int64).clamp(-1, vocab), torch.int32)
    top_p = _contiguous(top_p, torch.float32)
    min_p = _contiguous(min_p, torch.float32)
    seed = _contiguous(seed, torch.int64)
    step = _contiguous(step, torch.int64)
    tokens = torch.empty((batch,), dtype=torch.int64)
    _C.sample(log_probs.data_ptr(), batch, vocab, temperature.data_ptr(), top_k.data_ptr(),
              top_p.data_ptr(), min_p.data_ptr(), seed.data_ptr(), step.data_ptr(),
              tokens.data_ptr())
    return tokens


def combine_cpp(logits: torch.Tensor, weights: torch.Tensor, consts: torch.Tensor,
                group_coefs: torch.Tensor, group_kinds: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The C++ face of combine on CPU tensors; raises if lmarith._C is missing."""
    device = _validate_combine(logits, weights, consts, group_coefs, group_kinds)
    _require_cpp(device, "combine_cpp")
    return _combine_cpp_unchecked(logits, weights, consts, group_coefs, group_kinds)


def sample_cpp(log_probs: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
               top_p: torch.Tensor, min_p: torch.Tensor, seed: torch.Tensor,
               step: torch.Tensor) -> torch.Tensor:
    """The C++ face of sample on CPU tensors; raises if lmarith._C is missing."""
    device = _validate_sample(log_probs, temperature, top_k, top_p, min_p, seed, step)
    _require_cpp(device, "sample_cpp")
    return _sample_cpp_unchecked(log_probs, temperature, top_k, top_p, min_p, seed, step)


def combine(logits: torch.Tensor, weights: torch.Tensor, consts: torch.Tensor,
            group_coefs: torch.Tensor, group_kinds: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluate a formula plan on stacked logits [T, B, V] -> (log_probs [B, V] f32, lse [B] f32).

    Plan layout and semantics: kernels/reference.py. CUDA -> Triton, CPU -> C++.
    """
    device = _validate_combine(logits, weights, consts, group_coefs, group_kinds)
    if device.type == "cuda":
        from lmarith.kernels.combine import combine as triton_combine
        return triton_combine(logits, weights, consts, group_coefs, group_kinds)
    if device.type == "cpu" and _C is not None:
        return _combine_cpp_unchecked(logits, weights, consts, group_coefs, group_kinds)
    return reference.combine(logits, weights.float(), consts.float(), group_coefs.float(),
                             group_kinds.to(torch.int32))


def sample(log_probs: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, min_p: torch.Tensor, seed: torch.Tensor,
           step: torch.Tensor) -> torch.Tensor:
    """Draw one token per row of log_probs [B, V] -> int64 [B], reproducibly per (seed, step).

    Filters and the exponential race: kernels/reference.py. CUDA -> Triton, CPU -> C++.
    """
    device = _validate_sample(log_probs, temperature, top_k, top_p, min_p, seed, step)
    if device.type == "cuda":
        from lmarith.kernels.sample import sample as triton_sample
        return triton_sample(log_probs, temperature, top_k, top_p, min_p, seed, step)
    if device.type == "cpu" and _C is not None:
        return _sample_cpp_unchecked(log_probs, temperature, top_k, top_p, min_p, seed, step)
    return reference.sample(log_probs, temperature, top_k, top_p, min_p, seed, step)
