"""load_model: a Hugging Face directory (config.json + safetensors) or a .gguf file -> our model."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from safetensors import safe_open
from torch import nn

from lmarith.errors import LmarithError, ModelLoadError
from lmarith.models.config import ModelConfig, eos_ids
from lmarith.models.loading.gguf_names import GPT2_NAMES, LLAMA_NAMES, hf_name, unpermute_rows
from lmarith.models.loading.progress import progress
from lmarith.models.registry import MODEL_TYPES, lookup, model_class, parse_config

if TYPE_CHECKING:
    from lmarith.models.loading.gguf_file import GGUFFile
    from lmarith.models.sharding import TensorParallel

Weights = Iterator[tuple[str, torch.Tensor]]

ROPE_FACTORS = "rope_freqs.weight"
# A loading bar only for models with at least this many tensors (SmolLM2-135M has 273, the
# tiny test models ~20), and only once loading has lasted LOADING_BAR_DELAY seconds.
LOADING_BAR_MIN_TENSORS = 100
LOADING_BAR_DELAY = 1.0


def load_model(path: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
               quantization: str | None = None,
               tensor_parallel: "TensorParallel | None" = None) -> nn.Module:
    """Our implementation of the model at path (HF directory or .gguf file), ready for inference.

    quantization "auto": a GGUF file's quantized projections keep their blocks; "q8_0": every
    projection is quantised to q8_0 at load (any checkpoint). Any failure is a ModelLoadError
    naming the path (UnsupportedModelError for an unknown architecture). tensor_parallel:
    load only this rank's share of every layer (float weights only)."""
    check_model_path(path)
    try:
        return _load(str(path), dtype, device, quantization, tensor_parallel)
    except LmarithError:
        raise
    except Exception as error:  # a corrupt file can fail in any library: name the file
        raise ModelLoadError(f"cannot load model {path}: {type(error).__name__}: {error}") from error


def check_model_path(path: str) -> None:
    """ModelLoadError unless the path exists (before anything reads from it)."""
    if not Path(path).exists():
        raise ModelLoadError(f"model path {path} does not exist; give a Hugging Face directory "
                             "(config.json + *.safetensors) or a .gguf file")


def _load(path: str, dtype: torch.dtype, device: str, quantization: str | None,
          tensor_parallel: "TensorParallel | None") -> nn.Module:
    if path.endswith(".gguf"):
        from lmarith.models.loading.gguf_file import GGUFFile  # needs the gguf package
        file = GGUFFile(str(path))
        config = parse_config(gguf_raw_config(file), dtype)
        model = build_model(config, device, tensor_parallel)
        model.load_weights(_with_bar(gguf_weights(file, config), len(file.tensors), path))
        if ROPE_FACTORS in file.tensors:
            model.rotary.inv_freq = model.rotary.inv_freq / file.read(ROPE_FACTORS).to(device)
        if quantization == "auto":
            from lmarith.models.loading.gguf_quant import keep_file_quantization
            keep_file_quantization(model, file, config)
    else:
        config = parse_config(read_hf_config(Path(path)), dtype)
        model = build_model(config, device, tensor_parallel)
        weights = safetensors_weights(Path(path))
        model.load_weights(_with_bar(weights, safetensors_count(Path(path)), path))
    if quantization == "q8_0":
        from lmarith.models.quantization import quantize_linears_q8_0
        quantize_linears_q8_0(model)
    return model.to(device).requires_grad_(False).eval()


def _with_bar(weights: Weights, total: int, path: str) -> Weights:
    """The weights, drawing a loading bar on a terminal when the model is big and slow."""
    bar = progress(total=total, desc=f"loading {Path(path).name}", unit="tensor",
                   delay=LOADING_BAR_DELAY, min_total=LOADING_BAR_MIN_TENSORS, leave=False)
    with bar:
        for item in weights:
            yield item
            bar.update()


def build_model(config: ModelConfig, device: str | torch.device = "cpu",
                tensor_parallel: "TensorParallel | None" = None) -> nn.Module:
    """Allocate the model's parameters (uninitialised, in config.dtype) without running inits;
    with tensor_parallel, only this rank's share of each layer."""
    with torch.device("meta"):
        model = model_class(config)(config, device)
        if tensor_parallel is not None:
            tensor_parallel.apply(model)
    model = model.to(dtype=config.dtype).to_empty(device=device)
    model.tie_weights()
    return model


def read_hf_config(directory: Path) -> dict[str, Any]:
    """config.json, with generation_config.json's eos ids merged in."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{directory} has no config.json; give a Hugging Face model directory "
                             "or a .gguf file")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{config_file} is not valid JSON: {error}") from error
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{config_file} must hold a JSON object, got {type(raw).__name__}")
    generation = directory / "generation_config.json"
    if generation.exists():
        extra = json.loads(generation.read_text()).get("eos_token_id")
        raw["eos_token_id"] = list(eos_ids(raw.get("eos_token_id"), extra))
    return raw


def safetensors_files(directory: Path) -> list[Path]:
    """Weight files: those named by model.safetensors.index.json, else every *.safetensors."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / name for name in names]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {directory}")
    return files


def safetensors_count(directory: Path) -> int:
    """How many tensors the weight files hold (read from their headers only)."""
    total = 0
    for file in safetensors_files(directory):
        with safe_open(str(file), framework="pt") as handle:
            total += len(handle.keys())
    return total


def safetensors_weights(directory: Path) -> Weights:
    """(name, tensor) for every tensor of every weight file, read lazily from memory maps."""
    for file in safetensors_files(directory):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


def gguf_raw_config(file: "GGUFFile") -> dict[str, Any]:
    """A config.json-style dict built from GGUF metadata."""
    meta, tensors = file.metadata, file.tensors
    arch = meta["general.architecture"]

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    common = {
        "architectures": [MODEL_TYPES.get(arch, f"gguf:{arch}")], "model_type": arch,
        "vocab_size": get("vocab_size") or tensors["token_embd.weight"].shape[0],
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": list(eos_ids(meta.get("tokenizer.ggml.eos_token_id"),
                                     meta.get("tokenizer.ggml.eot_token_id"))),
    }
    lookup(common["architectures"][0])
    if arch == "gpt2":
        return {**common, "n_embd": get("embedding_length"), "n_head": get("attention.head_count"),
                "n_layer": get("block_count"), "n_positions": get("context_length"),
                "n_inner": get("feed_forward_length"),
                "layer_norm_epsilon": get("attention.layer_norm_epsilon", 1e-5)}
    scaling = get("rope.scaling.type", "none")
    return {**common, "hidden_size": get("embedding_length"),
            "intermediate_size": get("feed_forward_length"),
            "num_hidden_layers": get("block_count"),
            "num_attention_heads": get("attention.head_count"),
            "num_key_value_heads": get("attention.head_count_kv"),
            "head_dim": get("attention.key_length"),
            "max_position_embeddings": get("context_length"),
            "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
            "rope_theta": get("rope.freq_base", 10000.0),
            "rope_scaling": None if scaling == "none" else
            {"rope_type": scaling, "factor": get("rope.scaling.factor", 1.0)},
            "attention_bias": "blk.0.attn_output.bias" in tensors}


def gguf_weights(file: "GGUFFile", config: ModelConfig) -> Weights:
    """(HF name, float32 tensor in HF layout) for every GGUF tensor of a model."""
    arch = file.metadata["general.architecture"]
    table = GPT2_NAMES if arch == "gpt2" else LLAMA_NAMES
    permuted = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads}
    if arch != "llama":  # llama.cpp permutes q/k rows only for Llama-style conversions
        permuted = {}
    for name in file.tensors:
        if name == ROPE_FACTORS:
            continue
        tensor = file.read(name)
        kind = name.split(".")[-2]
        if kind in permuted:
            tensor = unpermute_rows(tensor, permuted[kind])
        if arch == "gpt2" and kind in ("attn_qkv", "attn_output", "ffn_up", "ffn_down") \
                and name.endswith(".weight"):
            tensor = tensor.t()
        yield hf_name(name, table), tensor
