"""The C++ faces (lmarith._C, OpenMP + SIMD) of combine, sample, spec_accept and
paged_attention, on inputs
already checked by bindings/checks.py: tensors are made contiguous in the dtypes the kernels
read and passed as raw pointers, so _C never depends on torch's C++ ABI."""
from __future__ import annotations

import os
from typing import Callable

import torch

from lmarith.errors import ConfigError
from lmarith.kernels import reference_attention

try:
    from lmarith import _C
except ImportError as error:  # a broken build still leaves the torch faces usable
    _C = None
    _C_IMPORT_ERROR: ImportError | None = error
else:
    _C_IMPORT_ERROR = None

_LOGITS_F32, _LOGITS_BF16 = 0, 1


def available() -> bool:
    """True when the C++ extension lmarith._C imported."""
    return _C is not None


def isa_code(env: str, codes: dict[str, int], isa: str | None = None,
             supported: Callable[[int], bool] | None = None) -> int:
    """A kernel family's instruction-path code for `isa` (default: $env, else "auto"); the
    families (quant_matmul, bf16_matmul, f32_matmul) each name their paths and their variable.
    A forced path this CPU lacks fails here, at load, not in the first forward."""
    name = (isa or os.environ.get(env) or "auto").lower()
    if name not in codes:
        raise ConfigError(f"{env} must be one of {', '.join(codes)}, got {name!r}")
    if supported is not None and _C is not None and not supported(codes[name]):
        usable = ", ".join(path for path, code in codes.items() if supported(code))
        raise ConfigError(f"{env}={name}: this CPU cannot run that path; unset {env} or pick "
                          f"one it can: {usable}")
    return codes[name]


def _contiguous(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype).contiguous()


def require(device: torch.device, face: str) -> None:
    """Raise unless the extension imported and the inputs are on the CPU."""
    if _C is None:
        raise RuntimeError(f"{face}: lmarith._C is not available ({_C_IMPORT_ERROR}); "
                           "rebuild with `pip install --no-build-isolation -e .`")
    if device.type != "cpu":
        raise ValueError(f"{face} runs on CPU tensors only, got {device}; move them with .cpu()")


def combine(logits: torch.Tensor, weights: torch.Tensor, consts: torch.Tensor,
            group_coefs: torch.Tensor, group_kinds: torch.Tensor,
            mask_weights: torch.Tensor | None = None, mask_log_alpha: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs lmarith._C.combine on validated CPU inputs (bf16 logits pass as raw bits; no
    plausibility mask passes address 0)."""
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
    mask = [] if mask_weights is None else [_contiguous(mask_weights, torch.float32),
                                            _contiguous(mask_log_alpha, torch.float32)]
    mask_addresses = [tensor.data_ptr() for tensor in mask] or [0, 0]
    log_probs = torch.empty((batch, vocab), dtype=torch.float32)
    lse = torch.empty((batch,), dtype=torch.float32)
    _C.combine(logits.data_ptr(), logits_code, num_terms, batch, vocab, weights.data_ptr(),
               consts.data_ptr(), 1 + 2 * num_groups, group_coefs.data_ptr(),
               group_kinds.data_ptr(), num_groups, *mask_addresses, log_probs.data_ptr(),
               lse.data_ptr())
    return log_probs, lse


def sample(log_probs: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
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


def spec_accept(target_log_probs: torch.Tensor, draft_log_probs: torch.Tensor,
                draft_tokens: torch.Tensor, num_drafts: torch.Tensor, seed: torch.Tensor,
                step: torch.Tensor, greedy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs lmarith._C.spec_accept on validated CPU inputs: (num_accepted int32 [B],
    next_token int64 [B])."""
    batch, positions, vocab = target_log_probs.shape
    target = _contiguous(target_log_probs, torch.float32)
    draft = _contiguous(draft_log_probs, torch.float32)
    tokens = _contiguous(draft_tokens, torch.int64)
    num_drafts = _contiguous(num_drafts, torch.int32)
    seed = _contiguous(seed, torch.int64)
    step = _contiguous(step, torch.int64)
    greedy = _contiguous(greedy, torch.uint8)
    num_accepted = torch.empty((batch,), dtype=torch.int32)
    next_token = torch.empty((batch,), dtype=torch.int64)
    _C.spec_accept(target.data_ptr(), draft.data_ptr(), tokens.data_ptr(), num_drafts.data_ptr(),
                   seed.data_ptr(), step.data_ptr(), greedy.data_ptr(), batch, positions - 1, vocab,
                   num_accepted.data_ptr(), next_token.data_ptr())
    return num_accepted, next_token


_ATTN_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
# Query rows per sequence above which paged_attention hands the step to the torch reference
# (gathered pages + SDPA); None: never. Measured on SmolLM2-135M shapes (9 heads, 3 kv heads,
# head_dim 64, 2 threads; `bench_latency.py --attention-rows 1 17 64 128 256 512`, one layer
# at context 512): the C++ kernel took 0.39, 0.45, 0.45, 0.64, 0.52, 0.37x the torch face's
# time, and a whole 2048-token prefill (2048-row chunks) ran ~2x faster (--context-sweep), so
# there is no crossover up to the engine's 2048-token chunks: SDPA computes the masked-out
# half of the causal square, the kernel skips it. Set it where a host's SDPA does win.
ATTENTION_MAX_QUERY_ROWS: int | None = None


def _attention_metadata(meta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The step's int64 contiguous (query_start, context_lens, block_tables), made once per
    step and kept in meta.scratch for the other layers."""
    key = "cpp_attention_metadata"
    if key not in meta.scratch:
        meta.scratch[key] = tuple(_contiguous(t, torch.int64) for t in
                                  (meta.query_start, meta.context_lens, meta.block_tables))
    return meta.scratch[key]


def _attention_in_place(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                        meta) -> bool:
    """True when the C++ kernel takes the step: float32/bfloat16 tensors (one cache dtype)
    with head_dim contiguous, and no sequence past ATTENTION_MAX_QUERY_ROWS rows (if set)."""
    return (query.dtype in _ATTN_DTYPES and key_cache.dtype in _ATTN_DTYPES
            and value_cache.dtype == key_cache.dtype and key_cache.stride(3) == 1
            and value_cache.stride(3) == 1
            and (ATTENTION_MAX_QUERY_ROWS is None or meta.max_query_len <= ATTENTION_MAX_QUERY_ROWS))


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    meta, scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """Runs lmarith._C.paged_attention on validated CPU inputs, reading K/V in place through
    the block table (caches may be strided views of an arena); other dtypes (and chunks past
    ATTENTION_MAX_QUERY_ROWS, when set) go to the torch reference."""
    if not _attention_in_place(query, key_cache, value_cache, meta):
        return reference_attention.paged_attention(query, key_cache, value_cache, meta, scale,
                                                   sliding_window)
    if query.stride(2) != 1:
        query = query.contiguous()
    query_start, context_lens, block_tables = _attention_metadata(meta)
    out = torch.empty(query.shape, dtype=query.dtype)
    num_pages, page_size, kv_heads, _ = key_cache.shape
    _C.paged_attention(query.data_ptr(), _ATTN_DTYPES[query.dtype], tuple(query.shape),
                       query.stride()[:2], key_cache.data_ptr(), value_cache.data_ptr(),
                       _ATTN_DTYPES[key_cache.dtype], key_cache.stride()[:3],
                       value_cache.stride()[:3], (num_pages, page_size, kv_heads),
                       query_start.data_ptr(), context_lens.data_ptr(), block_tables.data_ptr(),
                       context_lens.shape[0], block_tables.shape[1], float(scale),
                       sliding_window or 0, out.data_ptr())
    return out
