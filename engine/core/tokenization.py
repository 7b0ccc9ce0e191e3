"""How each term turns user text into its context token ids, shared by the reference
decoder and the engine so both read exactly the same tokens."""
from __future__ import annotations

from ..errors import FormulaError, PromptError
from ..formula import Term


def term_context_ids(term: Term, tokenizer, text: str) -> list[int]:
    """Token ids of the term's context for this user text.

    bare model: tokenizer(text) with the tokenizer's own special tokens (so a single model
    matches transformers); prompt: tokenizer(template.format(system=..., input=text));
    chat: the tokenizer's chat template with the system prompt and a generation prompt.
    """
    if term.chat:
        messages = [{"role": "user", "content": text}]
        if term.system:
            messages.insert(0, {"role": "system", "content": term.system})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    else:
        ids = tokenizer(term.context_text(text))["input_ids"]
    ids = list(ids)
    if not ids:
        raise PromptError(f"the prompt {text!r} tokenises to nothing for term {term}; "
                          "give a non-empty prompt")
    return ids


def check_same_vocabulary(tokenizers: dict) -> int:
    """All models of a formula must share one vocabulary; returns its size."""
    items = list(tokenizers.items())
    first_model, first_tokenizer = items[0]
    if len(items) == 1:
        return len(first_tokenizer)
    first_vocab = first_tokenizer.get_vocab()
    for model, tokenizer in items[1:]:
        if tokenizer.get_vocab() != first_vocab:
            raise FormulaError(
                f"models {first_model.path} and {model.path} have different vocabularies "
                f"({len(first_vocab)} vs {len(tokenizer.get_vocab())} tokens); every term of a "
                "formula must use the same tokenizer")
    return len(first_tokenizer)


def eos_token_ids(tokenizer, generation_config=None) -> set[int]:
    """Token ids that end generation: the generation config's EOS ids plus the tokenizer's."""
    ids: set[int] = set()
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
