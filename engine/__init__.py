"""lmarith: composed decoding over several language models.

Formulas over models (model arithmetic) compiled to fused kernels, served by an engine with
continuous batching over one paged KV cache shared by every model.
"""
from .config import EngineConfig, ModelSpec
from .errors import (CacheExhaustedError, ConfigError, EngineError, FormulaError, LmarithError,
                     ModelLoadError, PromptError, RequestAbortedError, SamplingParamsError,
                     UnsupportedModelError)
from .formula import (Classifier, ClassifierSpec, Constant, Formula, Indicator, Intersection, Linear,
                      Max, Min, Model, NgramDraft, Nudging, Plan, Plausible, SelfDebias, Speculative, Term, TopPTopK,
                      Union, compile_plan, parse_formula)
from . import methods
from .llm import LLM
from .outputs import EngineStats, RequestMetrics, RequestOutput, StreamChunk, TokenLogprob
from .sampling_params import SamplingParams

__all__ = [
    "CacheExhaustedError", "Classifier", "ClassifierSpec", "ConfigError", "Constant",
    "EngineConfig", "EngineError", "EngineStats", "Formula", "FormulaError", "Indicator",
    "Intersection", "LLM", "Linear", "LmarithError", "Max", "Min", "Model", "ModelLoadError",
    "ModelSpec", "NgramDraft", "Nudging", "Plan", "Plausible", "PromptError", "RequestAbortedError",
    "RequestMetrics", "RequestOutput", "SamplingParams", "SamplingParamsError", "SelfDebias",
    "Speculative", "StreamChunk", "Term", "TokenLogprob", "TopPTopK", "Union",
    "UnsupportedModelError", "compile_plan", "methods", "parse_formula",
]
