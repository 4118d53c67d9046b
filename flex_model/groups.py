"""Hook groups: which hooks carry which tags, and which fire in a pass.

Pure set logic, no torch. Members are any hashable objects (FlexModel uses
its HookFunctions). Every member carries the tag ``"all"``, which cannot be
removed. A group name, once created, stays known (it may become empty).
"""
from __future__ import annotations

from typing import Dict, FrozenSet, Hashable, Iterable, List, Set, Union

ALL = "all"


class HookGroups:
    """Tags of every hook, and the selection of hooks for one forward pass."""

    def __init__(self) -> None:
        self._tags: Dict[Hashable, Set[str]] = {}  # insertion order = registration order
        self._known: Set[str] = {ALL}

    # -- membership -------------------------------------------------------
    def add(self, member: Hashable) -> None:
        if member in self._tags:
            raise ValueError(f"{member!r} is already registered; remove its handle before registering it again")
        self._tags[member] = {ALL}

    def discard(self, member: Hashable) -> None:
        self._tags.pop(member, None)

    def __contains__(self, member: Hashable) -> bool:
        return member in self._tags

    def members(self) -> List[Hashable]:
        return list(self._tags)

    # -- tags -------------------------------------------------------------
    def tag(self, members: Iterable[Hashable], group: str) -> None:
        _check_name(group)
        members = list(members)
        for m in members:
            self._require(m)
        self._known.add(group)
        for m in members:
            self._tags[m].add(group)

    def untag(self, members: Iterable[Hashable], group: str) -> None:
        if group == ALL:
            raise ValueError('every hook belongs to group "all"; it cannot be removed from it '
                             "(remove the hook's handle to delete the hook)")
        members = list(members)
        for m in members:
            self._require(m)
        for m in members:
            self._tags[m].discard(group)

    def tags(self, member: Hashable) -> FrozenSet[str]:
        self._require(member)
        return frozenset(self._tags[member])

    def groups(self) -> Dict[str, List[Hashable]]:
        """Every known group name and its members, in registration order."""
        return {g: [m for m, t in self._tags.items() if g in t] for g in sorted(self._known)}

    # -- selection ----------------------------------------------------------
    def select(self, groups: Union[str, Iterable[str]] = ALL, complement: bool = False) -> Set[Hashable]:
        """The members that fire: the union of ``groups``, or every member outside it."""
        names = [groups] if isinstance(groups, str) else list(groups)
        unknown = [g for g in names if g not in self._known]
        if unknown:
            raise ValueError(f"unknown hook group(s) {unknown}; known groups: {sorted(self._known)}")
        chosen = {m for m, t in self._tags.items() if t.intersection(names)}
        return set(self._tags) - chosen if complement else chosen

    def _require(self, member: Hashable) -> None:
        if member not in self._tags:
            raise ValueError(f"{member!r} is not registered with this model")


def _check_name(group: str) -> None:
    if not isinstance(group, str) or not group:
        raise TypeError(f"a group name must be a non-empty string, got {group!r}")
