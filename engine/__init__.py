"""lmarith: composed decoding over several language models.

Formulas over models (model arithmetic), compiled to fused kernels, run by an engine.
"""
from .formula import Constant, Formula, FormulaError, Linear, Model, Term
from .formula_ops import (Classifier, ClassifierSpec, Indicator, Intersection, Max, Min,
                          SelfDebias, TopPTopK, Union)
from .plan import Plan, compile_plan
from .sampling_params import SamplingParams, SamplingParamsError
from .block_manager import CacheExhaustedError
from .engine import PromptError
from .llm import LLM, RequestOutput, StreamChunk

__all__ = [
    "Classifier", "ClassifierSpec", "Constant", "Formula", "FormulaError", "Indicator",
    "Intersection", "Linear", "Max", "Min", "Model", "Plan", "SelfDebias", "Term", "TopPTopK",
    "Union", "compile_plan", "SamplingParams", "SamplingParamsError", "CacheExhaustedError",
    "PromptError", "LLM", "RequestOutput", "StreamChunk",
]
