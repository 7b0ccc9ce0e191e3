"""NativeStack: a CPU llama-family model with quantized or packed float linears
(QuantLinear, F32Linear; BF16Linear in a bfloat16 model) runs its decoder layers in
one C++ call per forward (lmarith._C.DecoderStack, csrc/decoder_stack.cpp) instead of a
dozen Python-dispatched ops per layer; at batch 1 those ops cost more than the weights'
matmuls on a 135M model. The layer loop of LlamaForCausalLM.forward is the specification:
the stack calls the same C++ kernels in the same order (tests/models/test_native_stack.py
holds them to it). LMARITH_NATIVE_STACK=0 turns it off."""
from __future__ import annotations

import os
from typing import Optional

import torch

from lmarith.bindings import cpp, cpp_quant
from lmarith.models.attention import AttentionMetadata, KVCache
from lmarith.models.bf16_linear import BF16Linear
from lmarith.models.f32_linear import F32Linear
from lmarith.models.quantization import QuantLinear

ENV = "LMARITH_NATIVE_STACK"
_CACHE_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
# Packed float linears: (their panels' dtype, qtype code in bindings/stack_module.cpp, the
# model dtype whose stack runs them).
_PANELS = {F32Linear: (torch.float32, -1, torch.float32), BF16Linear: (torch.int16, -2, torch.bfloat16)}
_MODEL_DTYPES = {torch.float32: 0, torch.bfloat16: 1}   # activation dtype codes (csrc LogitsDtype)


def _panel_spec(linear: F32Linear | BF16Linear, keep: list) -> tuple:
    """(in, out, bias address, [one part]) of a packed float linear: row_bytes is a row's
    share of the panels (4 * in for float32, 2 * in rounded up to even for bfloat16)."""
    data = linear.packed.data.contiguous()
    keep.append(data)
    k = linear.in_features
    row_bytes = 4 * k if isinstance(linear, F32Linear) else 2 * (k + k % 2)
    bias = 0 if linear.bias is None else linear.bias.data.data_ptr()
    return (k, linear.out_features, bias,
            [(data.data_ptr(), _PANELS[type(linear)][1], linear.out_features, row_bytes)])


def _runs(linear: torch.nn.Module, dtype: torch.dtype) -> bool:
    """Whether the stack has a kernel for this projection of a `dtype` model: BF16Linear
    in bfloat16 models, F32Linear or quantized blocks in float32 ones."""
    if type(linear) in _PANELS:
        panels, _, model_dtype = _PANELS[type(linear)]
        return linear.packed.dtype == panels and dtype == model_dtype
    return (dtype == torch.float32 and isinstance(linear, QuantLinear)
            and all(q in cpp_quant.QTYPE_CODES for q in linear.qtypes))


def _linear_spec(linear: QuantLinear | F32Linear | BF16Linear, keep: list) -> tuple:
    """(in, out, bias address, [(data, qtype, rows, row_bytes)]) of one projection."""
    if type(linear) in _PANELS:
        return _panel_spec(linear, keep)
    parts = []
    for part in linear.parts():
        data = part.data.contiguous()
        keep.append(data)
        parts.append((data.data_ptr(), cpp_quant.QTYPE_CODES[part.qtype], part.out_features,
                      part.row_bytes))
    bias = 0 if linear.bias is None else linear.bias.data.data_ptr()
    return linear.in_features, linear.out_features, bias, parts


def eligible(model: torch.nn.Module) -> bool:
    """Whether the stack can run this model: the C++ extension, a float32 (bfloat16)
    llama-family model on CPU without q/k norms, SiLU MLPs, every projection an F32Linear or
    a QuantLinear of C++ qtypes (a BF16Linear), norms in the model's dtype."""
    config = getattr(model, "config", None)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if (not cpp.available() or os.environ.get(ENV, "1") == "0" or config is None
            or layers is None or config.qk_norm or config.dtype not in _MODEL_DTYPES):
        return False
    for layer in layers:
        if not getattr(layer.mlp, "fused_silu", False):
            return False
        if not all(_runs(layer.get_submodule(name), config.dtype) for name in _PROJECTIONS):
            return False
        norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
        if any(w.dtype != config.dtype or w.device.type != "cpu" for w in norms):
            return False
    return True


class NativeStack:
    """The model's decoder layers as one lmarith._C.DecoderStack (weights shared, not copied)."""

    def __init__(self, model: torch.nn.Module) -> None:
        config, self._keep = model.config, []
        self.dtype = config.dtype
        layers = []
        for layer in model.model.layers:
            specs = [_linear_spec(layer.get_submodule(name), self._keep) for name in _PROJECTIONS]
            norms = [layer.input_layernorm.weight.data, layer.post_attention_layernorm.weight.data]
            self._keep += norms
            layers.append((norms[0].data_ptr(), norms[1].data_ptr(), *specs,
                           layer.self_attn.window or 0))
        attention = model.model.layers[0].self_attn
        sizes = (config.hidden_size, attention.num_heads, attention.num_kv_heads, attention.head_dim,
                 config.intermediate_size)
        self.stack = cpp._C.DecoderStack(sizes, config.norm_eps, attention.scale,
                                         cpp_quant.isa_code(), layers, _MODEL_DTYPES[config.dtype])
        self._caches: Optional[tuple] = None

    def _cache_addresses(self, kv_caches: list[KVCache]) -> Optional[tuple]:
        """(caches, key addresses, value addresses, strides, shape, dtype code) for this list
        of layer caches, worked out once per list; None when the layers' layouts differ."""
        if self._caches is not None and self._caches[0] is kv_caches:
            return self._caches
        first = kv_caches[0][0]
        if first.dtype not in _CACHE_DTYPES or first.stride(3) != 1 or any(
                cache.stride() != first.stride() or cache.dtype != first.dtype
                or cache.shape != first.shape for pair in kv_caches for cache in pair):
            return None
        keys = torch.tensor([pair[0].data_ptr() for pair in kv_caches], dtype=torch.int64)
        values = torch.tensor([pair[1].data_ptr() for pair in kv_caches], dtype=torch.int64)
        self._caches = (kv_caches, keys, values, first.stride()[:3], tuple(first.shape[:2]),
                        _CACHE_DTYPES[first.dtype])
        return self._caches

    def __call__(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                 meta: AttentionMetadata, kv_caches: list[KVCache]) -> Optional[torch.Tensor]:
        """x + residual after the last layer (the final norm's input) for embeddings x
        [N, hidden]; None when these caches cannot be read in place (the caller loops)."""
        caches = self._cache_addresses(kv_caches)
        if caches is None or len(kv_caches) != self.stack.num_layers or x.dtype != self.dtype:
            return None
        _, keys, values, strides, shape, dtype_code = caches
        x = x.contiguous()
        cos, sin = (table.contiguous() for table in rope)
        starts, contexts, tables = cpp._attention_metadata(meta)
        slots = [t.to(torch.int64).contiguous() for t in (meta.slot_pages, meta.slot_offsets)]
        out = torch.empty_like(x)
        addresses = tuple(t.data_ptr() for t in (*slots, starts, contexts, tables))
        self.stack.forward(x.shape[0], x.data_ptr(), cos.data_ptr(), sin.data_ptr(), addresses,
                           contexts.shape[0], tables.shape[1], keys.data_ptr(), values.data_ptr(),
                           strides, shape, dtype_code, out.data_ptr())
        return out


def use_native_stack(model: torch.nn.Module) -> bool:
    """Give a CPU model a NativeStack when it is eligible; returns whether it got one."""
    model.native_stack = NativeStack(model) if eligible(model) else None
    return model.native_stack is not None
