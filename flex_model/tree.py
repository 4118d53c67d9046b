"""Nested hook values: find the tensor leaves and put an edited leaf back.

A hooked value (a module's output, its ``(args, kwargs)``, a tuple of
gradients) may be any nesting of tuples, lists, dicts, dataclasses,
namedtuples and HuggingFace ``ModelOutput``s. Its tensor leaves are numbered
depth-first: sequence items in order, dict values in insertion order,
dataclass fields in declaration order. ``unpack_idx`` indexes that list.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, List

import torch


def _children(obj: Any) -> List[Any] | None:
    """The traversable children of ``obj`` in leaf order, or None for a leaf."""
    if isinstance(obj, torch.Tensor):
        return None
    if isinstance(obj, dict):  # also OrderedDict and HF ModelOutput (a dict subclass)
        return list(obj.values())
    if isinstance(obj, (tuple, list)):
        return list(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    return None


def tensor_leaves(obj: Any) -> List[torch.Tensor]:
    """All tensor leaves of ``obj``, in the documented depth-first order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    out: List[torch.Tensor] = []
    for child in _children(obj) or []:
        out.extend(tensor_leaves(child))
    return out


def _rebuild(obj: Any, children: List[Any]) -> Any:
    """A shallow copy of ``obj``, of the same type, holding ``children``."""
    if isinstance(obj, dict):
        new = copy.copy(obj)
        for key, value in zip(list(obj.keys()), children):
            new[key] = value
        return new
    if isinstance(obj, tuple):
        return type(obj)._make(children) if hasattr(obj, "_fields") else type(obj)(children)
    if isinstance(obj, list):
        return type(obj)(children)
    new = copy.copy(obj)  # dataclass (frozen ones too)
    for field, value in zip(dataclasses.fields(obj), children):
        object.__setattr__(new, field.name, value)
    return new


def replace_leaf(obj: Any, index: int, new_leaf: torch.Tensor) -> Any:
    """``obj`` with its ``index``-th tensor leaf replaced (negative: from the end); containers keep their type."""
    n = len(tensor_leaves(obj))
    if not -n <= index < n:
        raise IndexError(f"tensor leaf index {index} is out of range: the value has {n} tensor leaves")
    counter = [index % n]

    def visit(node: Any) -> Any:
        if isinstance(node, torch.Tensor):
            counter[0] -= 1
            return new_leaf if counter[0] == -1 else node
        children = _children(node)
        if children is None or counter[0] < 0:
            return node
        before = counter[0]
        new_children = [visit(child) for child in children]
        if counter[0] >= 0 or before < 0:  # target not inside this node
            return node
        return _rebuild(node, new_children)

    return visit(obj)
