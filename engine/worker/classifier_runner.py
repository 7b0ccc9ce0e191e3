"""ClassifierScorer: the sequence-classification models behind Classifier formula terms.

Each ClassifierSpec is loaded once (transformers, local files only: nothing is downloaded)
and scores a list of texts in one batched forward. The reference decoder and the engine
share this class, so both read exactly the same classifier probabilities. A classifier has
no KV cache: every text is recomputed in full on every call.
"""
from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import torch

from ..errors import FormulaError, ModelLoadError, PromptError
from ..formula import ClassifierSpec


def from_pretrained_args(path: str) -> dict:
    """transformers from_pretrained arguments for an HF directory or a .gguf file."""
    location = Path(path)
    if location.suffix == ".gguf":
        return dict(pretrained_model_name_or_path=str(location.parent), gguf_file=location.name)
    return dict(pretrained_model_name_or_path=str(location))


def _load(spec: ClassifierSpec, device: str) -> tuple:
    """(model, tokenizer) of one spec, checked; ModelLoadError naming the path otherwise."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not Path(spec.path).exists():
        raise ModelLoadError(f"classifier {spec.path} does not exist; give the local directory of "
                             "a Hugging Face sequence-classification model (nothing is downloaded)")
    args = dict(from_pretrained_args(spec.path), local_files_only=True)
    try:
        dtype = getattr(torch, spec.dtype)
        model = AutoModelForSequenceClassification.from_pretrained(**args, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(**args)
    except Exception as error:
        raise ModelLoadError(f"cannot load classifier {spec.path} (dtype {spec.dtype}): "
                             f"{type(error).__name__}: {error}; give a local Hugging Face "
                             "sequence-classification model and a torch dtype name") from error
    _check_spec(spec, model.config.num_labels)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.padding_side = "right"     # positions as unpadded: scores do not depend on the batch
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


def _check_spec(spec: ClassifierSpec, num_labels: int) -> None:
    """The label must exist and the template must take exactly {input}."""
    if isinstance(spec.label, bool) or not isinstance(spec.label, int) or not 0 <= spec.label < num_labels:
        raise FormulaError(f"classifier {spec.path} has {num_labels} labels but the ClassifierSpec "
                           f"asks for label {spec.label!r}; use a label in 0..{num_labels - 1}")
    try:
        spec.template.format(input="")
    except (KeyError, IndexError, ValueError, AttributeError) as error:
        raise FormulaError(f"the classifier template {spec.template!r} cannot be filled with "
                           f"{{input}} alone ({error}); write it like 'Review: {{input}}'") from None


class ClassifierScorer:
    """Loaded classifiers (one per ClassifierSpec) and their batched scoring; `calls` counts
    the forwards per spec (the engine makes one per spec per step)."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.loaded: dict[ClassifierSpec, tuple] = {}
        self.calls: Counter[ClassifierSpec] = Counter()
        self._lock = threading.Lock()

    def load(self, spec: ClassifierSpec) -> None:
        """Load the spec unless it is loaded (any thread); ModelLoadError or FormulaError
        (bad label or template) otherwise, and nothing is registered."""
        with self._lock:
            if spec not in self.loaded:
                self.loaded[spec] = _load(spec, self.device)

    def log_prob(self, spec: ClassifierSpec, texts: list[str]) -> torch.Tensor:
        """log P(spec.label | template.format(input=text)) for each text [len(texts)], float32,
        in one batched forward."""
        self.load(spec)
        model, tokenizer = self.loaded[spec]
        batch = tokenizer([spec.template.format(input=t) for t in texts], return_tensors="pt",
                          padding=True).to(self.device)
        window = getattr(model.config, "max_position_embeddings", None)
        if window is not None and batch["input_ids"].shape[-1] > window:
            raise PromptError(f"classifier {spec.path} reads at most {window} tokens, but the prompt "
                              f"and generated text need {batch['input_ids'].shape[-1]}; shorten the "
                              "prompt or lower max_tokens")
        self.calls[spec] += 1
        with torch.inference_mode():
            logits = model(**batch).logits.float()
        return torch.log_softmax(logits, dim=-1)[:, spec.label]
