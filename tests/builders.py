"""Tiny random models with a trained byte-level BPE tokenizer, saved in Hugging Face
format: fast stand-ins for real checkpoints in engine tests."""
from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "The cat sat on the mat. The dog ran in the park.",
    "You are a helpful assistant. You are rude. You talk about magic and dragons.",
    "Tell me about cats, dogs, birds and fish. Paris is the capital of France.",
    "Once upon a time there was a small robot who loved to read books about the sea.",
] * 4
SPECIAL = ["<pad>", "<s>", "</s>"]


def make_tokenizer(vocab_size: int = 300, extra_text: str = ""):
    """A byte-level BPE tokenizer that adds <s> at the start, like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS + [extra_text] * 4, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def _randomise(model, seed: int) -> None:
    """Weights at a scale that gives O(1) logits, so greedy choices are not near-ties."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            is_norm = "norm" in name or ".ln_" in name
            noise = torch.randn(param.shape, generator=generator)
            scale = 0.3 if is_norm or param.dim() > 1 else 0.1
            base = 1.0 if is_norm and name.endswith("weight") else 0.0
            param.copy_(base + scale * noise)


def make_model(directory: Path, family: str = "llama", seed: int = 0, tokenizer=None,
               dtype=torch.float32, bigram: bool = False, **overrides) -> Path:
    """Save a 2-layer random model of the family with its tokenizer; returns the directory.
    bigram=True (llama-like families): a model whose greedy chains cycle, as text repeats."""
    import transformers

    tokenizer = tokenizer or make_tokenizer()
    # transformers loads Qwen tokenizers as Qwen2Tokenizer, which adds <|endoftext|>.
    vocab = len(tokenizer) + (1 if family.startswith("qwen") else 0)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    configs = {
        "llama": ("LlamaConfig", {}),
        "mistral": ("MistralConfig", {"sliding_window": None}),
        "qwen2": ("Qwen2Config", {}),
        "qwen3": ("Qwen3Config", {"head_dim": 32}),
        "gpt2": ("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256,
                                "vocab_size": vocab, "bos_token_id": 1, "eos_token_id": 2}),
    }
    name, extra = configs[family]
    settings = extra if family == "gpt2" else {**common, **extra}
    config = getattr(transformers, name)(**{**settings, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config)
    _randomise(model, seed)
    if bigram:  # attention writes nothing: the next token depends on the current one only
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.zero_()
    model.to(dtype).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


def assert_all_pages_free(llm) -> None:
    """After work every KV page is back on the free list and nothing is queued."""
    stats = llm.stats()
    assert stats.kv_pages_free == stats.kv_pages_total, stats
    assert stats.requests_running == 0 and stats.requests_waiting == 0, stats


def check_kv_invariants(llm) -> None:
    """The block manager's own consistency check, run on the engine thread between steps."""
    llm._loop.call(lambda: llm.engine.scheduler.block_manager.check_invariants()).result()


def call_alongside(llm, call):
    """Run call() on another thread while the engine thread is parked, so the request it
    submits is admitted alongside whatever is running now; returns (result, exception)."""
    import threading
    import time

    gate, parked = threading.Event(), threading.Event()

    def hold() -> None:  # the loop drains its queue before it runs this, so count after
        parked.set()
        gate.wait()
    llm._loop.call(hold)
    assert parked.wait(30), "the engine loop never ran the parking command"
    outcome: dict = {}

    def caller() -> None:
        try:
            outcome["result"] = call()
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=caller)
    thread.start()
    deadline = time.monotonic() + 60
    while llm._loop._commands.qsize() < 1 and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    gate.set()
    thread.join(120)
    return outcome.get("result"), outcome.get("error")


def make_word_tokenizer(vocab_size: int):
    """A whitespace word-level tokenizer with exactly vocab_size tokens ("w3", "w4", ...), for
    models with a realistic vocabulary (the BPE trainer cannot grow one from a tiny corpus)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL), vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def make_classifier(directory: Path, seed: int = 0, tokenizer=None, num_labels: int = 2,
                    **overrides) -> Path:
    """Save a 2-layer random Llama sequence classifier (pad id 0, so it scores batches) with
    make_tokenizer()'s tokenizer unless given one: the same vocabulary as make_model's
    models, as a FUDGE classifier of their text; returns the directory."""
    import transformers

    tokenizer = tokenizer or make_tokenizer()
    settings = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2, num_labels=num_labels)
    config = transformers.LlamaConfig(**{**settings, **overrides})
    model = transformers.AutoModelForSequenceClassification.from_config(config)
    _randomise(model, seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


def ascii_tokenizer(vocab_size: int):
    """A byte-level BPE over the corpus's own characters only, so any token sequence decodes
    to plain text the other tokenizer can encode; sizes differ -> words split differently."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def word_tokenizer(vocab_size: int):
    """Whitespace words "w0".."wN" with </s> (id 2) the only special token, so a random
    model cannot write an invisible token: text re-encodes to exactly the same ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    vocab["</s>"] = vocab.pop("w2")
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>")
