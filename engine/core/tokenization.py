"""How each term turns user text into its context token ids, shared by the reference
decoder and the engine so both read exactly the same tokens."""
from __future__ import annotations

from ..errors import FormulaError, PromptError
from ..formula import Term


def term_context_ids(term: Term, tokenizer, prompt) -> list[int]:
    """Token ids of the term's context for this prompt (user text or a conversation).

    text: a bare model reads tokenizer(text) with the tokenizer's own special tokens (so a
    single model matches transformers); a prompt term tokenizer(template.format(system=...,
    input=text)); a chat term the chat template over its system prompt and the text.
    conversation: every term reads its chat template over [its own system prompt, if any,
    replacing the conversation's] + the messages, with a generation prompt.
    """
    if isinstance(prompt, list):
        messages = [m for m in prompt if not (term.system and m["role"] == "system")]
        ids = _chat_ids(term, tokenizer, _with_system(term.system, messages))
    elif term.chat:
        ids = _chat_ids(term, tokenizer, _with_system(term.system, [{"role": "user", "content": prompt}]))
    else:
        ids = list(tokenizer(term.context_text(prompt))["input_ids"])
    if not ids:
        raise PromptError(f"the prompt {prompt!r:.80} tokenises to nothing for term {term}; "
                          "give a non-empty prompt")
    return ids


def _with_system(system, messages: list) -> list:
    return ([{"role": "system", "content": system}] if system else []) + list(messages)


def _chat_ids(term: Term, tokenizer, messages: list) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError(f"model {term.model.path} has no chat template, so it cannot read a "
                          "chat or a conversation; send plain text, or use a model with one")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


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
