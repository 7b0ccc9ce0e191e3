"""Every error a user can cause derives from LmarithError and from the builtin a caller would
naturally catch (ValueError for bad values, OSError for files), and its message says what to
change. One module, so that every layer raises from the same hierarchy."""
from __future__ import annotations


class LmarithError(Exception):
    """Base of every error lmarith raises on purpose."""


class FormulaError(LmarithError, ValueError):
    """A formula that cannot be evaluated as written."""


class PromptError(LmarithError, ValueError):
    """A prompt the engine cannot serve (empty, not text, longer than a model's context)."""


class SamplingParamsError(LmarithError, ValueError):
    """Sampling parameters out of range; the message names the field and its valid range."""


class ConfigError(LmarithError, ValueError):
    """Engine settings out of range (KV budget, batch limits, page size, device)."""


class CacheExhaustedError(LmarithError, RuntimeError):
    """The KV pool has too few free pages; the block manager's state is left unchanged."""


class ModelLoadError(LmarithError, OSError):
    """A model that cannot be loaded: missing or corrupt file, bad dtype; names the file."""


class UnsupportedModelError(ModelLoadError, ValueError):
    """The checkpoint's architecture has no implementation here."""


class RequestAbortedError(LmarithError, RuntimeError):
    """The request was cancelled (a client went away, or the LLM was shut down)."""


class EngineError(LmarithError, RuntimeError):
    """An internal failure of one step; the requests it touched fail, the engine carries on."""
