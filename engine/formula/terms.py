"""The leaves of a formula: a Model (weights, nothing loaded yet) and a Term (one model read
on one context: the bare user text, a prompt template, or the chat template)."""
from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Optional, Union

from ..config import ModelSpec
from ..errors import FormulaError
from . import registry
from .node import EvalContext, Formula, call_text

TEMPLATE_FIELDS = {"system", "input"}
MAX_FACTOR = 64
DEFAULT_TEMPLATE = "{system}\n{input}"
AUTO = "auto"              # speculative_factor chosen per request from its acceptance rate
AUTO_MAX_FACTOR = 8
Factor = Union[int, str]


def check_template(template: str) -> str:
    """A prompt template must be a format string using only {system} and {input}, with {input}."""
    if not isinstance(template, str):
        raise FormulaError(f"a prompt template must be a string, got {template!r}")
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as error:
        raise FormulaError(f"template {template!r} is not a valid format string ({error}); "
                           "write literal braces as {{ and }}") from None
    unknown = names - TEMPLATE_FIELDS
    if unknown:
        raise FormulaError(f"template {template!r} uses unknown field(s) "
                           f"{', '.join('{' + n + '}' for n in sorted(unknown))}; only {{system}} "
                           "and {input} are filled in")
    if "input" not in names:
        raise FormulaError(f"template {template!r} must contain '{{input}}'")
    return template


@registry.register("model", plan_role="term")
@dataclass(frozen=True)
class Model(Formula):
    """A model (nothing loads yet): a Hugging Face directory or a .gguf file, in a dtype.

    Used bare, it is the term whose context is the user text, tokenised as tokenizer(text).
    """

    path: str
    dtype: str = "float32"

    def __post_init__(self) -> None:
        spec = ModelSpec(self.path, self.dtype)
        object.__setattr__(self, "path", spec.path)

    @property
    def spec(self) -> ModelSpec:
        """The weights this model term runs: what runners and KV views are keyed by."""
        return ModelSpec(self.path, self.dtype)

    def prompt(self, system: str, template: str = DEFAULT_TEMPLATE,
               speculative_factor: Factor = 1) -> "Term":
        """A term whose context is tokenizer(template.format(system=system, input=text)).
        speculative_factor k > 1: the term runs every k tokens and verifies them (see Term)."""
        return Term(self, system, check_template(template), speculative_factor=speculative_factor)

    def chat(self, system: Optional[str] = None, speculative_factor: Factor = 1) -> "Term":
        """A term whose context is the tokenizer's chat template with this system prompt."""
        return Term(self, system, None, chat=True, speculative_factor=speculative_factor)

    def as_term(self, speculative_factor: Factor = 1) -> "Term":
        """The bare-text term of this model (speculative_factor as in prompt)."""
        return Term(self, speculative_factor=speculative_factor)

    def canonical(self) -> "Term":
        return self.as_term()

    def _leaves(self):
        yield self.as_term()

    def evaluate(self, ctx: EvalContext):
        return self.as_term().evaluate(ctx)

    def norm_bounds(self) -> tuple[float, float]:
        return 1.0, 1.0

    def __str__(self) -> str:
        return call_text("M", **self.model_fields())

    def model_fields(self) -> dict:
        """model= (and dtype= when not float32) of the formula-string syntax."""
        return {"model": self.path, **({"dtype": self.dtype} if self.dtype != "float32" else {})}


@registry.register("term", plan_role="term")
@dataclass(frozen=True)
class Term(Formula):
    """A leaf: one model run on one context (bare text, a prompt template, or chat).

    speculative_factor k > 1 makes the engine compute this term only once k new tokens are
    pending, scoring them in one forward; meanwhile tokens are drawn from the formula over
    the terms computed there, and verified exactly when this term catches up. "auto" picks
    k from 1 to AUTO_MAX_FACTOR per request from its measured acceptance rate.
    """

    model: Model
    system: Optional[str] = None
    template: Optional[str] = None
    chat: bool = False
    speculative_factor: Factor = 1

    def __post_init__(self) -> None:
        if not isinstance(self.model, Model):
            raise FormulaError(f"a term's model must be a Model, got {self.model!r}")
        if self.system is not None and not isinstance(self.system, str):
            raise FormulaError(f"a system prompt must be a string or None, got {self.system!r}")
        if self.template is not None:
            check_template(self.template)
        if not isinstance(self.chat, bool):
            raise FormulaError(f"chat must be true or false, got {self.chat!r}")
        if self.chat and self.template is not None:
            raise FormulaError("a chat term uses the tokenizer's chat template; give no template")
        factor = self.speculative_factor
        if factor != AUTO and (isinstance(factor, bool) or not isinstance(factor, int)
                               or not 1 <= factor <= MAX_FACTOR):
            raise FormulaError(f"speculative_factor must be an integer from 1 to {MAX_FACTOR} "
                               f"or \"auto\", got {factor!r}")
        if self.system is not None and self.template is None and not self.chat:
            raise FormulaError(f"the system prompt {self.system!r} needs a template or chat=True; "
                               "use model.prompt(system) or model.chat(system)")

    @property
    def spec(self) -> ModelSpec:
        return self.model.spec

    def _leaves(self):
        yield self

    def evaluate(self, ctx: EvalContext):
        try:
            return ctx.term_log_probs[self], 1.0
        except KeyError:
            raise FormulaError(f"no logits were given for term {self}") from None

    def norm_bounds(self) -> tuple[float, float]:
        return 1.0, 1.0

    def context_text(self, text: str) -> str:
        """The text this term's model reads for a user input (chat handled by the caller)."""
        if self.template is None:
            return text
        return self.template.format(system=self.system or "", input=text)

    def __str__(self) -> str:
        extra = dict(self.model.model_fields())
        if self.template is not None and self.template != DEFAULT_TEMPLATE or (
                self.template is not None and self.system is None):
            extra["template"] = self.template
        if self.speculative_factor != 1:
            extra["speculative_factor"] = self.speculative_factor
        system = () if self.system is None else (self.system,)
        return call_text("Chat" if self.chat else "M", *system, **extra)
