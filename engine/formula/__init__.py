"""The formula algebra of model arithmetic. `node` holds the base class and the linear nodes
(Constant, Linear), `terms` the leaves (Model, Term), `operators` Union/Intersection and the
other non-linear nodes; every node registers itself in `registry` (JSON op, plan role,
whether the engine serves it), which `plan` reads to compile a formula into the flat tensors
the fused combine kernels take. `parser` reads formula strings (the syntax str(formula) prints); `speculative` holds Speculative(target, draft, k) and the model-free NgramDraft.
Nothing here knows about the engine."""
from .node import Constant, EvalContext, Formula, Linear, as_formula, normalise
from .operators import (Classifier, ClassifierSpec, Indicator, Intersection, Max, Min, Plausible,
                        SelfDebias, TopPTopK, Union)
from .nudging import Nudging
from .parser import parse_formula
from .plan import Plan, compile_plan, served_by_engine, stack_plans
from .registry import NodeInfo, node_info, register, registered_ops
from .speculative import NgramDraft, Speculative
from .terms import Model, Term

__all__ = [
    "Classifier", "ClassifierSpec", "Constant", "EvalContext", "Formula", "Indicator",
    "Intersection", "Linear", "Max", "Min", "Model", "NgramDraft", "NodeInfo", "Nudging", "Plan",
    "Plausible", "SelfDebias", "Speculative", "Term", "TopPTopK", "Union", "as_formula",
    "compile_plan", "node_info", "normalise", "parse_formula", "register", "registered_ops",
    "served_by_engine", "stack_plans",
]
