"""Formula strings: `M('You are helpful.') - 0.6*M('You are rude.', model='small')`.

The text is read by Python's own `ast` parser, then walked over a whitelist (numbers,
strings, + - * /, parentheses, calls of known names with literal keywords); nothing is ever
evaluated, so a string from an HTTP request is safe. `ast` gives exact columns for errors
and the operator precedence users expect, which a hand grammar would only repeat.
Names: `M(system, model=, template=, speculative_factor=, dtype=)` (no system: the bare
model), `Chat(system, model=, speculative_factor=, dtype=)`, and every formula node by its
class name (Union, Intersection, Max, Min, TopPTopK, SelfDebias, Indicator, Constant,
Plausible, Speculative, NgramDraft). `model=` is a name of `models` (the first is the default) or a path.
"""
from __future__ import annotations

import ast
import operator
from typing import Any, Callable, Mapping, Optional, Union as TypingUnion

from ..errors import FormulaError
from .node import Constant, Formula
from .nudging import Nudging
from .operators import Indicator, Intersection, Plausible, SelfDebias, TopPTopK, Union
from .speculative import NgramDraft, Speculative
from .terms import DEFAULT_TEMPLATE, Model, Term

MAX_LENGTH = 100_000
NODES: dict[str, Callable[..., Formula]] = {
    "Union": Union, "Intersection": Intersection, "Max": Union, "Min": Intersection,
    "TopPTopK": TopPTopK, "SelfDebias": SelfDebias, "Indicator": Indicator, "Constant": Constant,
    "Speculative": Speculative, "NgramDraft": NgramDraft, "Plausible": Plausible,
    "Nudging": Nudging,
}
OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
             ast.Div: operator.truediv}
Value = TypingUnion[Formula, int, float, str, None]


def parse_formula(text: str, models: Optional[Mapping[str, TypingUnion[Model, str]]] = None) -> Formula:
    """The formula a string describes; FormulaError (with the column) when it is not one."""
    if not isinstance(text, str):
        raise FormulaError(f"a formula string must be a str, got {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise FormulaError(f"the formula string has {len(text)} characters; the limit is {MAX_LENGTH}")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as error:
        raise FormulaError(f"formula syntax error at column {error.offset or 1}: {error.msg}") from None
    except (RecursionError, MemoryError):
        raise FormulaError("the formula string nests too deeply") from None
    result = _Reader(models or {}).read(tree.body)
    if not isinstance(result, Formula):
        raise FormulaError(f"{text!r} is a {type(result).__name__}, not a formula; write a model "
                           "term such as M() or M('system prompt')")
    return result


def _fail(node: ast.AST, message: str) -> FormulaError:
    return FormulaError(f"{message} at column {getattr(node, 'col_offset', 0) + 1}")


class _Reader:
    """Walks the syntax tree over the whitelist, building formulas as it goes."""

    def __init__(self, models: Mapping[str, TypingUnion[Model, str]]) -> None:
        self.models = {name: m if isinstance(m, Model) else Model(m) for name, m in models.items()}

    def read(self, node: ast.AST) -> Value:
        try:
            if isinstance(node, ast.Constant):
                return self._constant(node)
            if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
                left, right = self.read(node.left), self.read(node.right)
                return self._arithmetic(node, OPERATORS[type(node.op)], left, right)
            if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
                operand = self.read(node.operand)
                return self._arithmetic(node, operator.mul, -1.0 if isinstance(node.op, ast.USub)
                                        else 1.0, operand)
            if isinstance(node, ast.Call):
                return self._call(node)
        except FormulaError as error:
            if "at column" in str(error):
                raise
            raise _fail(node, str(error)) from None
        raise _fail(node, f"{type(node).__name__.lower()} is not part of formula syntax; use "
                          "numbers, quoted strings, + - * /, parentheses and calls such as M(...)")

    def _constant(self, node: ast.Constant) -> Value:
        value = node.value
        if isinstance(value, bool):
            return value      # flags such as Nudging's full_drafts=
        if not isinstance(value, (int, float, str)) and value is not None:
            raise _fail(node, f"{value!r} is not a number or a quoted string")
        return value          # ints stay ints: top_k=, k=, speculative_factor= need them

    def _arithmetic(self, node: ast.AST, op, left: Value, right: Value) -> Value:
        for side in (left, right):
            if isinstance(side, str) or side is None:
                raise _fail(node, f"cannot do arithmetic with {side!r}; strings go inside M(...)")
        if op is operator.truediv and not isinstance(left, Formula) and right == 0:
            raise _fail(node, "division by zero")
        return op(left, right)

    def _call(self, node: ast.Call) -> Formula:
        if not isinstance(node.func, ast.Name):
            raise _fail(node, "only plain names can be called, such as M(...) or Union(...)")
        name = node.func.id
        args = [self.read(arg) for arg in node.args]
        kwargs = {kw.arg: self.read(kw.value) for kw in node.keywords if kw.arg is not None}
        if len(kwargs) != len(node.keywords):
            raise _fail(node, "**arguments are not part of formula syntax")
        builders = {"M": self._model_term, "Chat": self._chat_term}
        build = builders.get(name) or NODES.get(name)
        if build is None:
            known = ", ".join(sorted([*builders, *NODES]))
            raise _fail(node, f"unknown name {name!r}; known: {known}")
        try:
            return build(*args, **kwargs)
        except TypeError as error:  # the message without the Python function's name
            raise _fail(node, f"bad arguments for {name}: {str(error).split('() ', 1)[-1]}") from None

    def _model(self, model: Optional[str], dtype: Optional[str]) -> Model:
        if model is None:
            if not self.models:
                raise FormulaError("no default model: name one with model='NAME' or a path, or "
                                   "give the parser models")
            found = next(iter(self.models.values()))
        elif not isinstance(model, str):
            raise FormulaError(f"model= must be a quoted name or path, got {model!r}")
        else:
            found = self.models.get(model) or Model(model)
        return found if dtype is None else Model(found.path, dtype)

    def _model_term(self, system: Optional[str] = None, *, model: Optional[str] = None,
                    template: Optional[str] = None, speculative_factor: Any = 1,
                    dtype: Optional[str] = None) -> Formula:
        """M(): the bare model; M('system'): a prompted term (template default "{system}\\n{input}")."""
        base = self._model(model, dtype)
        if system is None and template is None:
            return base if speculative_factor == 1 else base.as_term(speculative_factor)
        template = DEFAULT_TEMPLATE if template is None else template
        return Term(base, system, template, speculative_factor=speculative_factor)

    def _chat_term(self, system: Optional[str] = None, *, model: Optional[str] = None,
                   speculative_factor: Any = 1, dtype: Optional[str] = None) -> Formula:
        """Chat(): the model's chat template, with this system prompt if given."""
        return self._model(model, dtype).chat(system, speculative_factor=speculative_factor)
