"""Loading weights and tokenizers: Hugging Face directories (config.json + safetensors,
sharded too) and GGUF files (our own fast header reader), mapped onto our model classes.
Every failure is a ModelLoadError naming the file."""
from lmarith.models.loading.loader import build_model, check_model_path, load_model
from lmarith.models.loading.tokenizer import load_tokenizer

__all__ = ["build_model", "check_model_path", "load_model", "load_tokenizer"]
