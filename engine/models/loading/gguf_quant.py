"""Keep a GGUF file's quantized blocks in the model: after the (float) weights are loaded,
each projection whose checkpoint tensors are quantized in a format the kernels know is
swapped for a QuantLinear over the file's own bytes (rows permuted as the float path does).
Llama-family files only: GPT-2 files store transposed Conv1D weights, whose rows are not the
layer's output rows."""
from __future__ import annotations

from typing import Optional

from gguf import GGMLQuantizationType
from torch import nn

from lmarith.kernels.quant_formats import QuantWeight
from lmarith.models.config import ModelConfig
from lmarith.models.loading.gguf_file import GGUFFile, TensorInfo
from lmarith.models.loading.gguf_names import LLAMA_NAMES, hf_name, unpermute_rows
from lmarith.models.llama import PACKED
from lmarith.models.quantization import replace_linear

QTYPE_NAMES = {GGMLQuantizationType.Q8_0: "q8_0", GGMLQuantizationType.Q4_0: "q4_0",
               GGMLQuantizationType.Q4_1: "q4_1", GGMLQuantizationType.Q5_0: "q5_0",
               GGMLQuantizationType.Q5_1: "q5_1", GGMLQuantizationType.Q4_K: "q4_k",
               GGMLQuantizationType.Q6_K: "q6_k"}


def keep_file_quantization(model: nn.Module, file: GGUFFile, config: ModelConfig) -> int:
    """Swap the model's linears for QuantLinears over the file's blocks; returns how many."""
    arch = file.metadata["general.architecture"]
    if arch == "gpt2":
        return 0
    heads = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads} if arch == "llama" else {}
    sources = _linear_sources(file, heads)
    if config.tie_word_embeddings and "lm_head" not in sources:
        sources["lm_head"] = sources.get("model.embed_tokens", [])
    swapped = 0
    for target, parts in sources.items():
        try:
            module = model.get_submodule(target)
        except AttributeError:
            continue
        weights = [weight for _, weight in sorted(parts, key=lambda item: item[0])]
        if isinstance(module, nn.Linear) and weights and all(w is not None for w in weights):
            replace_linear(model, target, weights)
            swapped += 1
    return swapped


def _linear_sources(file: GGUFFile, heads: dict) -> dict[str, list[tuple[int, Optional[QuantWeight]]]]:
    """Our module name -> [(part index in the fused layer, the part's QuantWeight or None)]."""
    sources: dict[str, list] = {}
    for name, info in file.tensors.items():
        if not name.endswith(".weight") or len(info.shape) != 2:
            continue
        module = hf_name(name, LLAMA_NAMES)[: -len(".weight")]
        prefix, _, proj = module.rpartition(".")
        target, part = (f"{prefix}.{PACKED[proj][0]}", PACKED[proj][1]) if proj in PACKED else (module, 0)
        sources.setdefault(target, []).append((part, _quant_weight(file, info, heads.get(name.split(".")[-2]))))
    return sources


def _quant_weight(file: GGUFFile, info: TensorInfo, heads: Optional[int]) -> Optional[QuantWeight]:
    """The tensor's blocks as a QuantWeight (q/k rows un-permuted), None if not quantized."""
    qtype = QTYPE_NAMES.get(info.qtype)
    if qtype is None:
        return None
    data = file.raw(info.name)
    if heads:
        data = unpermute_rows(data, heads).contiguous()
    return QuantWeight(qtype, data, info.shape[0], info.shape[1])
