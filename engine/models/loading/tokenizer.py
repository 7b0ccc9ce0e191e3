"""The tokenizer of a model, from the same place its weights come from."""
from __future__ import annotations

from pathlib import Path

from lmarith.errors import ModelLoadError


def load_tokenizer(path: str):
    """The transformers tokenizer of an HF directory or a .gguf file."""
    from transformers import AutoTokenizer

    location = Path(path)
    try:
        if location.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(location.parent), gguf_file=location.name)
        return AutoTokenizer.from_pretrained(str(location))
    except Exception as error:  # transformers raises many kinds for a broken directory
        raise ModelLoadError(f"cannot load the tokenizer of {path}: {type(error).__name__}: "
                             f"{error}") from error
