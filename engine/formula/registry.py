"""The formula node registry. Each node class registers itself with its JSON op name and its
capability flags (its role in a fused-kernel plan, whether the engine serves it); JSON
encoding, plan compilation and the engine's checks read this table, so adding a node touches
only the file that defines it. Nothing here imports a node module."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..errors import FormulaError, LmarithError

PLAN_ROLES = ("term", "constant", "linear", "max", "min", "mask")
MAX_JSON_DEPTH = 256


@dataclass(frozen=True)
class NodeInfo:
    """What the rest of lmarith may know about one node class."""

    op: str
    cls: type
    plan_role: Optional[str] = None   # how plan.py flattens it ("mask": a top-level
                                      # plausibility mask); None: no fused plan
    engine: bool = True               # False: only lmarith.reference.generate evaluates it


_BY_OP: dict[str, NodeInfo] = {}
_BY_CLASS: dict[type, NodeInfo] = {}


def register(op: str, *, plan_role: Optional[str] = None, engine: bool = True) -> Callable[[type], type]:
    """Class decorator: record a node class under its JSON op name."""
    if plan_role is not None and plan_role not in PLAN_ROLES:
        raise ValueError(f"unknown plan role {plan_role!r}")

    def decorate(cls: type) -> type:
        if op in _BY_OP and _BY_OP[op].cls is not cls:
            raise ValueError(f"formula op {op!r} is already registered by {_BY_OP[op].cls.__name__}")
        info = NodeInfo(op, cls, plan_role, engine)
        _BY_OP[op] = info
        _BY_CLASS[cls] = info
        return cls
    return decorate


def node_info(node: Any) -> NodeInfo:
    """The registry entry of a node (its own class, not a base's)."""
    try:
        return _BY_CLASS[type(node)]
    except KeyError:
        raise FormulaError(f"{type(node).__name__} is not a registered formula node") from None


def registered_ops() -> list[str]:
    """Every op name the JSON decoder accepts."""
    return sorted(_BY_OP)


def encode(node: Any) -> dict[str, Any]:
    """A node as a JSON-ready dict {"op": ..., fields...}."""
    return {"op": node_info(node).op, **node.to_dict(encode)}


def decode(data: Any, where: str = "$", depth: int = 0) -> Any:
    """The node a dict describes; FormulaError naming the place in the document otherwise."""
    if depth > MAX_JSON_DEPTH:
        raise _located(f"formula JSON nests deeper than {MAX_JSON_DEPTH} levels", where)
    if not isinstance(data, dict):
        raise _located(f"must be an object with an \"op\" field, got {type(data).__name__}", where)
    op = data.get("op")
    if not isinstance(op, str) or op not in _BY_OP:
        raise _located(f"unknown formula op {op!r}; known ops: {', '.join(registered_ops())}", where)

    def child(value: Any, field: str) -> Any:
        return decode(value, f"{where}.{field}", depth + 1)

    try:
        return _BY_OP[op].cls.from_dict(data, child)
    except FormulaError as error:
        if getattr(error, "json_path", None):
            raise
        raise _located(f"op {op!r}: {error}", where) from error
    except (LmarithError, KeyError, TypeError, ValueError, AttributeError) as error:
        raise _located(f"malformed formula JSON (op {op!r}): {type(error).__name__}: {error}",
                       where) from error


def _located(message: str, where: str) -> FormulaError:
    """A FormulaError that says where in the JSON document it happened."""
    error = FormulaError(f"formula JSON at {where}: {message}")
    error.json_path = where
    return error
