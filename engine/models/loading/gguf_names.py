"""How GGUF tensors map onto Hugging Face names and layouts (shared by the float loader and
the quantized path)."""
from __future__ import annotations

import torch

# GGUF tensor name -> Hugging Face name; "{}" is the layer index.
LLAMA_NAMES = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "blk.{}.attn_norm": "model.layers.{}.input_layernorm",
    "blk.{}.ffn_norm": "model.layers.{}.post_attention_layernorm",
    "blk.{}.attn_q": "model.layers.{}.self_attn.q_proj",
    "blk.{}.attn_k": "model.layers.{}.self_attn.k_proj",
    "blk.{}.attn_v": "model.layers.{}.self_attn.v_proj",
    "blk.{}.attn_output": "model.layers.{}.self_attn.o_proj",
    "blk.{}.attn_q_norm": "model.layers.{}.self_attn.q_norm",
    "blk.{}.attn_k_norm": "model.layers.{}.self_attn.k_norm",
    "blk.{}.ffn_gate": "model.layers.{}.mlp.gate_proj",
    "blk.{}.ffn_up": "model.layers.{}.mlp.up_proj",
    "blk.{}.ffn_down": "model.layers.{}.mlp.down_proj",
}
GPT2_NAMES = {
    "token_embd": "transformer.wte", "position_embd": "transformer.wpe",
    "output_norm": "transformer.ln_f", "output": "lm_head",
    "blk.{}.attn_norm": "transformer.h.{}.ln_1", "blk.{}.attn_qkv": "transformer.h.{}.attn.c_attn",
    "blk.{}.attn_output": "transformer.h.{}.attn.c_proj",
    "blk.{}.ffn_norm": "transformer.h.{}.ln_2",
    "blk.{}.ffn_up": "transformer.h.{}.mlp.c_fc", "blk.{}.ffn_down": "transformer.h.{}.mlp.c_proj",
}


def hf_name(name: str, table: dict[str, str]) -> str:
    """Hugging Face name of a GGUF tensor name such as blk.3.attn_q.weight."""
    stem, _, leaf = name.rpartition(".")
    parts = stem.split(".")
    layer = parts[1] if parts[0] == "blk" and len(parts) > 2 else None
    key = f"blk.{{}}.{'.'.join(parts[2:])}" if layer is not None else stem
    if key not in table:
        raise ValueError(f"GGUF tensor {name!r} is not understood")
    return f"{table[key].format(layer)}.{leaf}"


def unpermute_rows(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order (rotary pairs interleaved) into HF's rotate-half order."""
    shape = tensor.shape
    paired = tensor.reshape(heads, shape[0] // heads // 2, 2, *shape[1:])
    return paired.transpose(1, 2).reshape(shape)
