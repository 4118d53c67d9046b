"""Hook groups: ``flex_model.groups.HookGroups`` alone, and FlexModel's group API against a set model.

The property test drives random create / update / remove / handle removal /
forward(groups=, complement=) sequences on a FlexModel and, in parallel, on
plain Python sets of tags; after every forward, the hooks that actually
fired (counted through ``output_dict``) must be the ones the sets predict.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from _test.models import TinyGPT, lm_loss
from flex_model import FlexModel
from flex_model.groups import HookGroups

torch.set_num_threads(1)


# -- HookGroups alone ------------------------------------------------------------------
def test_members_carry_all_and_keep_registration_order():
    g = HookGroups()
    for m in ["c", "a", "b"]:
        g.add(m)
    assert g.members() == ["c", "a", "b"]
    assert g.tags("a") == frozenset({"all"})
    assert g.groups() == {"all": ["c", "a", "b"]}
    assert g.select() == {"a", "b", "c"}


def test_tag_untag_select_and_complement():
    g = HookGroups()
    for m in "abcd":
        g.add(m)
    g.tag(["a", "b"], "x")
    g.tag(["b", "c"], "y")
    assert g.select("x") == {"a", "b"}
    assert g.select(["x", "y"]) == {"a", "b", "c"}
    assert g.select("x", complement=True) == {"c", "d"}
    assert g.select(["x", "y"], complement=True) == {"d"}
    assert g.select("all", complement=True) == set()
    g.untag(["b"], "x")
    assert g.select("x") == {"a"} and g.tags("b") == frozenset({"all", "y"})
    g.untag(["a"], "x")
    assert g.select("x") == set() and g.groups()["x"] == []  # an emptied group stays known


def test_add_twice_discard_and_unknown_members():
    g = HookGroups()
    g.add("a")
    with pytest.raises(ValueError, match="already registered"):
        g.add("a")
    g.discard("a")
    g.discard("a")  # idempotent
    assert "a" not in g and g.members() == []
    with pytest.raises(ValueError, match="not registered"):
        g.tag(["a"], "x")
    with pytest.raises(ValueError, match="not registered"):
        g.tags("a")


def test_tag_is_all_or_nothing():
    g = HookGroups()
    g.add("a")
    with pytest.raises(ValueError, match="not registered"):
        g.tag(["a", "ghost"], "x")
    assert g.tags("a") == frozenset({"all"}) and "x" not in g.groups()


def test_removing_all_raises_and_bad_names():
    g = HookGroups()
    g.add("a")
    with pytest.raises(ValueError, match='group "all"'):
        g.untag(["a"], "all")
    with pytest.raises(ValueError, match=r"unknown hook group\(s\) \['nope'\]; known groups: \['all'\]"):
        g.select(["all", "nope"])
    for bad in ["", None, 3]:
        with pytest.raises(TypeError, match="non-empty string"):
            g.tag(["a"], bad)


# -- FlexModel against a set model ---------------------------------------------------------
CONSTRUCTORS = ["mlp.up", "attn.proj", "ln_f", "layers.1.mlp.down", "layers.0.ln"]
GROUPS = ["a", "b", "c"]
IDX = torch.randint(0, 61, (1, 4), generator=torch.Generator().manual_seed(0))


class GroupsMachine(RuleBasedStateMachine):
    """FlexModel's hook groups vs ``tags: {HookFunction: set of group names}``."""

    @initialize()
    def setup(self):
        torch.manual_seed(0)
        self.output_dict = {}
        self.flex = FlexModel(TinyGPT(n_layers=2, d_model=8, n_heads=2, d_hidden=8), self.output_dict)
        self.tags = {}
        self.known = {"all"}

    def hooks(self):
        return list(self.tags)

    @precondition(lambda self: len(self.tags) < 12)
    @rule(group=st.sampled_from(GROUPS), constructor=st.sampled_from(CONSTRUCTORS))
    def create(self, group, constructor):
        made = self.flex.create_hook_group(group, constructor)
        expected = [n for n in self.flex.wrapped_module_names if constructor in n]
        assert sorted(h.module_name for h in made) == sorted(expected)
        for h in made:
            self.tags[h] = {"all", group}
        self.known.add(group)

    def _pick(self, data, how):
        """A spec for update/remove: one hook, a list of hooks, or a substring; and who it selects."""
        if how == "substring":
            sub = data.draw(st.sampled_from(CONSTRUCTORS + ["layers", "nothing-matches"]))
            return sub, [h for h in self.tags if sub in h.module_name]
        chosen = data.draw(st.lists(st.sampled_from(self.hooks()), min_size=1, max_size=3, unique=True))
        return (chosen[0], chosen[:1]) if how == "one" else (chosen, chosen)

    @precondition(lambda self: self.tags)
    @rule(group=st.sampled_from(GROUPS), how=st.sampled_from(["one", "list", "substring"]), data=st.data())
    def update(self, group, how, data):
        spec, chosen = self._pick(data, how)
        if not chosen:
            with pytest.raises(ValueError, match="no registered hook has a module name containing"):
                self.flex.update_hook_groups(spec, group)
            return
        self.flex.update_hook_groups(spec, group)
        for h in chosen:
            self.tags[h].add(group)
        self.known.add(group)

    @precondition(lambda self: self.tags)
    @rule(group=st.sampled_from(GROUPS + ["all"]), how=st.sampled_from(["one", "list", "substring"]),
          data=st.data())
    def remove_from_group(self, group, how, data):
        spec, chosen = self._pick(data, how)
        if not chosen:
            with pytest.raises(ValueError, match="no registered hook"):
                self.flex.remove_hook_groups(spec, group)
        elif group == "all":
            with pytest.raises(ValueError, match='group "all"'):
                self.flex.remove_hook_groups(spec, group)
        else:
            self.flex.remove_hook_groups(spec, group)
            for h in chosen:
                self.tags[h].discard(group)

    @precondition(lambda self: self.tags)
    @rule(data=st.data())
    def remove_handle(self, data):
        hook = data.draw(st.sampled_from(self.hooks()))
        self.flex.remove_hook(hook)  # create_hook_group returns HookFunctions, not handles
        self.flex.remove_hook(hook)  # idempotent
        del self.tags[hook]
        with pytest.raises(ValueError, match="not registered"):  # a removed hook cannot be tagged
            self.flex.update_hook_groups([hook], "a")

    @rule(groups=st.lists(st.sampled_from(GROUPS + ["all", "zzz"]), min_size=1, max_size=3, unique=True),
          complement=st.booleans(), as_str=st.booleans())
    def forward(self, groups, complement, as_str):
        arg = groups[0] if as_str else groups
        names = [arg] if as_str else groups
        self.output_dict.clear()
        if any(g not in self.known for g in names):
            with pytest.raises(ValueError, match="unknown hook group"):
                self.flex(IDX, groups=arg, complement=complement)
            return
        self.flex(IDX, groups=arg, complement=complement)
        fired = Counter({k: len(v) for k, v in self.output_dict.items()})
        selected = [h for h, t in self.tags.items() if bool(t & set(names)) != complement]
        assert fired == Counter(h.module_name for h in selected)

    @invariant()
    def groups_agree(self):
        if not hasattr(self, "flex"):
            return
        assert self.flex.get_hook_function_groups() == self.tags
        listed = self.flex.get_group_hook_functions()
        assert set(listed) == self.known
        for g in self.known:
            assert set(listed[g]) == {h for h, t in self.tags.items() if g in t}


GroupsMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
test_groups_against_set_model = GroupsMachine.TestCase


# -- explicit cases ------------------------------------------------------------------------------
def make_flex():
    torch.manual_seed(0)
    output_dict = {}
    return FlexModel(TinyGPT(), output_dict), output_dict


def test_hook_switched_off_fires_again_when_selected():
    flex, out = make_flex()
    [up] = flex.create_hook_group("up", "layers.0.mlp.up")
    flex.create_hook_group("down", "layers.0.mlp.down")
    flex(IDX, groups="down")
    assert set(out) == {"layers.0.mlp.down"}
    flex(IDX, groups="up")
    flex(IDX)
    assert len(out["layers.0.mlp.up"]) == 2 and len(out["layers.0.mlp.down"]) == 2
    flex(IDX, groups="up", complement=True)
    assert len(out["layers.0.mlp.up"]) == 2 and len(out["layers.0.mlp.down"]) == 3


def test_groups_select_backward_hooks_of_that_pass():
    flex, out = make_flex()
    flex.create_hook_group("g", "layers.0.mlp.down", hook_type="full_backward")
    flex.create_hook_group("t", "layers.1.mlp.up.weight", hook_type="tensor")
    lm_loss(flex(IDX, groups="t"), IDX).backward()
    assert set(out) == {"layers.1.mlp.up.weight"}
    lm_loss(flex(IDX, groups="g"), IDX).backward()
    assert len(out["layers.0.mlp.down"]) == 1 and len(out["layers.1.mlp.up.weight"]) == 1


def test_group_errors():
    flex, _ = make_flex()
    hooks = flex.create_hook_group("g", "mlp.up")
    with pytest.raises(ValueError, match='group "all"'):
        flex.remove_hook_groups(hooks, "all")
    with pytest.raises(ValueError, match=r"unknown hook group\(s\) \['nope'\]; known groups: \['all', 'g'\]"):
        flex(IDX, groups=["g", "nope"])
    with pytest.raises(ValueError, match="unknown hook_type 'sideways'"):
        flex.create_hook_group("h", "mlp", hook_type="sideways")
    with pytest.raises(ValueError, match='no module name contains "mlpp"'):
        flex.create_hook_group("h", "mlpp")
    with pytest.raises(TypeError, match="expected HookFunctions"):
        flex.update_hook_groups(["mlp.up"], "g")


def test_regex_constructor():
    flex, _ = make_flex()
    hooks = flex.create_hook_group("r", r"^layers\.\d+\.mlp$", regex=True)
    assert [h.module_name for h in hooks] == ["layers.0.mlp", "layers.1.mlp"]
    params = flex.create_hook_group("p", r"up\.bias$", hook_type="tensor", regex=True)
    assert [h.module_name for h in params] == ["layers.0.mlp.up.bias", "layers.1.mlp.up.bias"]
    assert all([r.hook_type for r in flex.registrations(h)] == ["tensor"] for h in params)
