"""JSON round-trip of formulas: a tree of {"op": ..., ...} objects, stable across versions."""
from __future__ import annotations

import json
from typing import Any

from .formula import Constant, Formula, FormulaError, Linear, Model, Term
from .formula_ops import (Classifier, ClassifierSpec, Indicator, Intersection, SelfDebias, TopPTopK,
                          Union)


def _encode(node: Formula) -> dict[str, Any]:
    if isinstance(node, Model):
        return {"op": "model", "path": node.path, "dtype": node.dtype}
    if isinstance(node, Term):
        return {"op": "term", "model": _encode(node.model), "system": node.system,
                "template": node.template, "chat": node.chat}
    if isinstance(node, Constant):
        return {"op": "constant", "value": node.value}
    if isinstance(node, Linear):
        return {"op": "linear", "items": [[_encode(child), weight] for child, weight in node.items]}
    if isinstance(node, Union):
        op = "intersection" if isinstance(node, Intersection) else "union"
        return {"op": op, "left": _encode(node.left), "right": _encode(node.right)}
    if isinstance(node, TopPTopK):
        return {"op": "top_p_top_k", "formula": _encode(node.formula), "top_k": node.top_k,
                "top_p": node.top_p, "temperature": node.temperature}
    if isinstance(node, SelfDebias):
        return {"op": "self_debias", "formula": _encode(node.formula), "bias": _encode(node.bias),
                "strength": node.strength}
    if isinstance(node, Indicator):
        return {"op": "indicator", "formula": _encode(node.formula)}
    if isinstance(node, Classifier):
        spec = node.classifier
        return {"op": "classifier", "base": _encode(node.base), "k": node.k,
                "classifier": {"path": spec.path, "label": spec.label,
                               "template": spec.template, "dtype": spec.dtype}}
    raise FormulaError(f"cannot serialise {type(node).__name__}")


def _decode(data: dict[str, Any]) -> Formula:
    op = data.get("op")
    if op == "model":
        return Model(data["path"], data.get("dtype", "float32"))
    if op == "term":
        return Term(_decode(data["model"]), data.get("system"), data.get("template"),
                    bool(data.get("chat", False)))
    if op == "constant":
        return Constant(float(data["value"]))
    if op == "linear":
        return Linear(tuple((_decode(child), float(weight)) for child, weight in data["items"]))
    if op in ("union", "intersection"):
        cls = Union if op == "union" else Intersection
        return cls(_decode(data["left"]), _decode(data["right"]))
    if op == "top_p_top_k":
        return TopPTopK(_decode(data["formula"]), int(data["top_k"]), float(data["top_p"]),
                        float(data["temperature"]))
    if op == "self_debias":
        return SelfDebias(_decode(data["formula"]), _decode(data["bias"]), float(data["strength"]))
    if op == "indicator":
        return Indicator(_decode(data["formula"]))
    if op == "classifier":
        return Classifier(_decode(data["base"]), ClassifierSpec(**data["classifier"]), int(data["k"]))
    raise FormulaError(f"unknown formula op {op!r} in JSON")


def formula_to_json(formula: Formula) -> str:
    return json.dumps(_encode(formula), sort_keys=True)


def formula_from_json(text: str) -> Formula:
    try:
        return _decode(json.loads(text))
    except (KeyError, TypeError, json.JSONDecodeError) as error:
        raise FormulaError(f"malformed formula JSON: {error}") from error
