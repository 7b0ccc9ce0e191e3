"""Building blocks shared by the model families: norms, activations, rotary embeddings."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from lmarith.bindings import ops
from lmarith.models.config import ModelConfig


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (GPT-2's 'gelu_new')."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu,
    "gelu_new": gelu_tanh, "gelu_pytorch_tanh": gelu_tanh, "gelu_fast": gelu_tanh,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Activation function by its config.json name."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported "
                         f"(supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, scaled by a learned weight in the model
    dtype; given a residual, the residual add is fused in (ops.rms_norm)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Normalise the last axis: norm(x), or (norm(x + residual), x + residual)."""
        normed, summed = ops.rms_norm(x, self.weight, self.eps, residual)
        return normed if residual is None else (normed, summed)


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama-3.1 frequency rescaling: slow down long wavelengths, keep short ones, blend between."""
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_ctx / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    blended = torch.where(wavelen > old_ctx / low, inv_freq / factor, blended)
    return torch.where(wavelen < old_ctx / high, inv_freq, blended)


def rope_inv_freq(config: ModelConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """Inverse rotary frequencies [head_dim/2] in float32 for the config's rope type."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    return llama3_inv_freq(inv_freq, scaling)


class RotaryEmbedding:
    """Rotate-half rotary position embedding; cos/sin are computed from positions each step."""

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu") -> None:
        self.inv_freq = rope_inv_freq(config, device)

    def cos_sin(self, positions: torch.Tensor,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, 1, head_dim] for token positions [N], cast to the activation dtype."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat([angles, angles], dim=-1)[:, None, :]
        return angles.cos().to(dtype), angles.sin().to(dtype)


class GatedMLP(nn.Module):
    """act(gate(x)) * up(x) -> down, with gate and up fused into one matmul."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(size, config.hidden_size, bias=config.mlp_bias)
        self.act = activation(config.hidden_act)
        self.fused_silu = config.hidden_act in ("silu", "swish")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Feed-forward block (SiLU's gate and product in one op)."""
        gate_up = self.gate_up_proj(x)
        if self.fused_silu:
            return self.down_proj(ops.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class WeightFiller:
    """Copies checkpoint tensors into a module's parameters and reports any left unfilled."""

    def __init__(self, module: nn.Module) -> None:
        self.params = dict(module.named_parameters())
        self.rows_filled = {name: 0 for name in self.params}
        self.slicers = getattr(module, "weight_slicers", {})   # tensor parallel: this rank's share

    def fill(self, name: str, tensor: torch.Tensor, rows: slice | None = None) -> None:
        """Copy tensor into parameter `name`, or into its rows `rows` for fused projections."""
        slicer = self.slicers.get(name)
        if slicer is not None:
            if slicer.kind == "skip":
                return
            tensor, rows = slicer(tensor, rows)
            name = slicer.target or name
        if name not in self.params:
            raise ValueError(f"checkpoint weight {name!r} has no place in the model")
        target = self.params[name].data
        target = target if rows is None else target[rows]
        if target.shape != tensor.shape:
            raise ValueError(f"weight {name!r}: checkpoint shape {tuple(tensor.shape)}, "
                             f"model expects {tuple(target.shape)}")
        target.copy_(tensor)
        self.rows_filled[name] += target.shape[0] if target.dim() else 1

    def finish(self) -> None:
        """Raise if any parameter (or part of a fused one) got no weights."""
        missing = [name for name, param in self.params.items()
                   if self.rows_filled[name] < (param.shape[0] if param.dim() else 1)]
        if missing:
            raise ValueError(f"checkpoint lacks weights for: {', '.join(missing)}")


class CausalLMHead(nn.Module):
    """What every decoder LM here shares: an output head over the vocabulary, tied to the
    input embedding when the config says so, giving float32 logits."""

    config: ModelConfig
    lm_head: nn.Module

    def input_embedding(self) -> nn.Embedding:
        raise NotImplementedError

    def tie_weights(self) -> None:
        """Share the input embedding with the output head when the config says so."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.input_embedding().weight

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary scores [M, vocab] in float32."""
        return self.lm_head(hidden).float()
