"""The node registry: a node defined in one place (here, in this test) is serialised, parsed
back, planned and checked by the engine through the registry alone; malformed JSON is a
FormulaError that says where."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

import lmarith as la
from lmarith.formula import Formula, as_formula, node_info, register, registered_ops, served_by_engine

MODEL = la.Model("/models/a")


@register("test_halve")
@dataclass(frozen=True)
class Halve(Formula):
    """A node that exists only in this test: half of f's value, f's norm."""

    formula: Formula
    label: str = "half"

    def __post_init__(self) -> None:
        object.__setattr__(self, "formula", as_formula(self.formula))

    def children(self):
        return (self.formula,)

    def evaluate(self, ctx):
        value, norm = self.formula.evaluate(ctx)
        return value / 2, norm

    def norm_bounds(self):
        return self.formula.norm_bounds()


@register("test_reference_only", engine=False)
@dataclass(frozen=True)
class ReferenceOnly(Halve):
    """A node the engine must refuse."""


def test_a_new_node_round_trips_through_json_and_gets_no_plan():
    formula = MODEL.prompt("Hi.") + 0.5 * Halve(MODEL, label="x")
    assert "test_halve" in registered_ops() and node_info(Halve(MODEL)).plan_role is None
    restored = la.Formula.from_json(formula.to_json())
    assert restored == formula
    assert la.compile_plan(formula) is None
    assert served_by_engine(formula) is None
    assert served_by_engine(formula + ReferenceOnly(MODEL)) == "test_reference_only"


def test_registry_rejects_a_second_class_under_one_op():
    with pytest.raises(ValueError, match="already registered"):
        register("test_halve")(type("Other", (Halve,), {}))


@pytest.mark.parametrize("text, phrase", [
    ("[1, 2]", "must be an object"),
    ("null", "must be an object"),
    ('"model"', "must be an object"),
    ('{"op": "nope"}', "unknown formula op 'nope'"),
    ('{"path": "/m"}', "unknown formula op None"),
    ('{"op": "union", "left": {"op": "model", "path": 5}, "right": {"op": "model", "path": "/m"}}', r"at \$\.left"),
    ('{"op": "constant", "value": "abc"}', "must be a number"),
    ('{"op": "constant", "value": NaN}', "finite"),
    ('{"op": "linear", "items": [[{"op": "model", "path": "/m"}, Infinity]]}', "finite"),
    ('{"op": "linear", "items": {"a": 1}}', "must be a list"),
    ('{"op": "linear", "items": [[{"op": "model", "path": "/m"}]]}', "item 0 of a linear node"),
    ('{"op": "union", "left": {"op": "model", "path": "/m"}}', "needs at least two"),
    ('{"op": "term", "model": {"op": "model", "path": "/m"}, "template": "{foo} {input}"}',
     "unknown field"),
    ('{"op": "model", "path": "/m", "colour": "red"}', "unknown field"),
    ('{"op": "model", "path": "/m", "dtype": "int8"}', "float32"),
    ('{"op": "top_p_top_k", "formula": {"op": "model", "path": "/m"}, "top_k": "5"}', "top_k"),
    ("{not json", "malformed formula JSON"),
])
def test_malformed_json_is_a_formula_error(text, phrase):
    with pytest.raises(la.FormulaError, match=phrase):
        la.Formula.from_json(text)


def test_deep_nesting_is_a_formula_error():
    text = '{"op": "indicator", "formula": ' * 5000 + '{"op": "model", "path": "/m"}' + "}" * 5000
    with pytest.raises(la.FormulaError, match="deep"):
        la.Formula.from_json(text)
    shallow = json.dumps({"op": "indicator", "formula": {"op": "model", "path": "/m"}})
    assert la.Formula.from_json(shallow) == la.Indicator(la.Model("/m"))
