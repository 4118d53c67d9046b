"""Hook points inside a module's forward, and standard names that mean the same on every architecture.

Three things a hook can go on besides the modules of the tree, all resolved by
``flex_model.names`` like module names and used by every FlexModel feature
(hook kinds, groups, edits, captures, gradients, ``describe()``) unchanged:

1. **Attention internals of HuggingFace models** (``ATTENTION_POINTS``):
   ``<attention module>.q``, ``.k``, ``.v``, ``.scores``, ``.pattern``,
   ``.z``. Installing them registers one attention function,
   ``attention_forward``, in transformers' ``AttentionInterface`` under the
   name ``ATTENTION_IMPLEMENTATION`` (with the eager mask builder in
   ``AttentionMaskInterface``), gives every HF attention module a
   ``HookPoint`` per value, and points the attention modules' configs at that
   function. HF's own attention modules then call it, so nothing in their
   source changes. It passes q, k, v and the per-head output through their
   hook points and, when ``scores`` / ``pattern`` are hooked (or the model
   ran eager attention, or ``output_attentions=True`` asks for them, or
   ``add_hook_points(eager=True)``), computes attention with eager math
   itself (GQA by repeating k/v, the model's scaling, soft-capping, the
   additive or boolean mask, softmax in float32, dropout after the pattern);
   otherwise it hands q, k, v to SDPA. ``uninstall`` puts every config's
   implementation back and removes the points.
2. **Named intermediates** (``Intermediate``): the value returned by the
   ``index``-th call of one torch function in a module's own forward code
   (``torch.overrides.TorchFunctionMode`` entered by a wrapper of that
   module's ``forward``), passed through a ``HookPoint``.
3. **Aliases** (``standard_aliases``): ``embed``, ``blocks.{i}.resid_pre``,
   ``.attn_out``, ``.resid_mid``, ``.mlp_out``, ``.resid_post``,
   ``.attn.{q,k,v,scores,pattern,z}``, ``ln_final``, ``unembed``, found from
   the model's structure.

Hook points are not children in the module tree (not in any ``_modules``): the
model's ``named_modules()``, ``state_dict()`` and ``repr`` stay exactly as they
were while they are installed. A module's points live in one plain attribute,
``module._flex_hook_points`` (an ``AttentionPoints``), which the attention
function reads; ``uninstall`` deletes it.
"""
from __future__ import annotations

import inspect
import linecache
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from flex_model.names import Alias, NameResolver
from flex_model.tree import tensor_leaves

ATTENTION_IMPLEMENTATION = "flex_model"  # the name registered in transformers' AttentionInterface
ATTENTION_POINTS = ("q", "k", "v", "scores", "pattern", "z")
POINTS_ATTRIBUTE = "_flex_hook_points"  # where an attention module keeps its AttentionPoints
TP_DIM_ATTRIBUTE = "_flex_tp_dim"  # read by flex_model.placement: {"output"/"input": dim or (dim, full size)}
# The head dim of each attention value (HF layouts): q/k/v/scores/pattern (batch, heads, ...), z (batch, query,
# heads, head dim); which head count it has (q heads, or k/v heads under GQA).
HEAD_DIMS = {"q": (1, "q"), "k": (1, "kv"), "v": (1, "kv"), "scores": (1, "q"), "pattern": (1, "q"), "z": (2, "q")}
VALUE_KINDS = ("forward", "forward_pre")  # on an alias, both mean the value
GRAD_KINDS = ("full_backward", "full_backward_pre")  # on an alias, both mean its gradient


class HookPoint(nn.Module):
    """An identity module placed on a value computed inside another module's forward.

    Every hook kind works on it: a forward hook sees (and may replace) the
    value, a forward pre-hook sees it as ``((value,), {})``, backward hooks its
    gradient. ``_flex_tp_dim`` (optional) declares which dim is split over
    tensor parallel ranks (see ``flex_model.placement``)."""

    def __init__(self, name: str, tp_dims: Optional[Dict[str, Any]] = None) -> None:
        super().__init__()
        self.point = name
        if tp_dims:
            setattr(self, TP_DIM_ATTRIBUTE, dict(tp_dims))

    def forward(self, x: Any) -> Any:
        return x

    def extra_repr(self) -> str:
        return self.point


def has_hooks(module: nn.Module) -> bool:
    """Whether any hook sits on ``module`` (its own, not global ones)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


# == 1. attention internals of HuggingFace models ===========================================================
@dataclass(eq=False)
class AttentionPoints:
    """One attention module's hook points and what it ran before they were installed."""

    points: Dict[str, HookPoint]
    original: Optional[str]  # the config's attention implementation before install
    eager: bool = False  # always compute eager math (``add_hook_points(eager=True)``)

    def needs_eager(self, kwargs: Dict[str, Any]) -> bool:
        return (self.eager or self.original in ("eager", None) or bool(kwargs.get("output_attentions"))
                or kwargs.get("softcap") is not None
                or has_hooks(self.points["scores"]) or has_hooks(self.points["pattern"]))


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                      dropout: float = 0.0, **kwargs: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The attention function HF attention modules call while hook points are installed.

    Takes what HF passes to any attention function: q ``(batch, heads, query, head dim)``, k and v
    ``(batch, kv heads, key, head dim)`` (after rotary embeddings and the cache update), the mask built
    by the eager mask builder (additive, ``(batch or 1, 1, query, key)``), scaling, dropout and
    keywords (``softcap``, ``sliding_window`` (already in the mask), ``output_attentions``, ...).
    Returns ``(z (batch, query, heads, head dim), attention weights or None)`` as HF's own do."""
    state = module.__dict__.get(POINTS_ATTRIBUTE)
    if state is None:  # a module whose points were taken away while its config still names us
        return _eager(module, None, query, key, value, attention_mask, scaling, dropout, **kwargs)
    p = state.points
    query, key, value = p["q"](query), p["k"](key), p["v"](value)
    if state.needs_eager(kwargs):
        out, weights = _eager(module, p, query, key, value, attention_mask, scaling, dropout, **kwargs)
    else:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        kwargs.pop("output_attentions", None)
        out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                              scaling=scaling, **kwargs)
    return p["z"](out), weights


def _eager(module: nn.Module, p: Optional[Dict[str, HookPoint]], query: torch.Tensor, key: torch.Tensor,
           value: torch.Tensor, mask: Optional[torch.Tensor], scaling: Optional[float], dropout: float,
           softcap: Optional[float] = None, **kwargs: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    """HF's eager attention, written out, with the scores and the pattern passed through their points."""
    for unsupported in ("s_aux", "sinks"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"{type(module).__name__} passes {unsupported!r} (attention sinks) to its "
                                      "attention function; flex_model's attention hook points do not compute "
                                      "them: call flex.restore() (or do not install attention hook points)")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # GQA: each k/v head serves ``groups`` query heads (HF's repeat_kv)
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    q_len, k_len = scores.shape[-2], scores.shape[-1]
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal  # as HF's SDPA function reads it
    if mask is None and q_len > 1 and causal:
        # a mask built for SDPA's is_causal path (None): causal, aligned to the last key
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril(k_len - q_len)
    if mask is not None:
        mask = mask[..., :k_len]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    if p is not None:
        scores = p["scores"](scores)
    pattern = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if p is not None:
        pattern = p["pattern"](pattern)
    weights = F.dropout(pattern, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


_REGISTERED = False


def register_attention() -> None:
    """Register ``attention_forward`` (and the eager mask builder) with transformers, once per process."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION_IMPLEMENTATION, attention_forward)
    AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, eager_mask)
    _REGISTERED = True


_ATTENTION_CLASSES: Dict[type, bool] = {}


def is_hf_attention(module: nn.Module) -> bool:
    """An attention module of transformers that calls the attention-function registry (read off its
    forward's source once per class: ``ALL_ATTENTION_FUNCTIONS.get_interface(``)."""
    cls = type(module)
    known = _ATTENTION_CLASSES.get(cls)
    if known is None:
        known = False
        config = getattr(module, "config", None)
        if "transformers" in sys.modules and config is not None and hasattr(config, "_attn_implementation"):
            try:
                known = "ALL_ATTENTION_FUNCTIONS.get_interface(" in inspect.getsource(inspect.unwrap(cls.forward))
            except (OSError, TypeError):
                known = False
        _ATTENTION_CLASSES[cls] = known
    return known


def _head_counts(config: Any) -> Dict[str, Optional[int]]:
    q = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or q
    return {"q": q if isinstance(q, int) else None, "kv": kv if isinstance(kv, int) else None}


def attention_points(module: nn.Module) -> Dict[str, HookPoint]:
    """A fresh hook point per attention value, each declaring its head dim (and full head count, from the
    config) as the dim split over tensor parallel ranks."""
    heads = _head_counts(module.config)
    out = {}
    for name in ATTENTION_POINTS:
        dim, which = HEAD_DIMS[name]
        full = heads[which]
        out[name] = HookPoint(name, {"output": (dim, full), "input": (dim, full)} if full else None)
    return out


# == 2. named intermediates: a torch function call inside one module's forward ===============================
_CALL_IMPL_CODES = {nn.Module._call_impl.__code__, nn.Module._wrapped_call_impl.__code__}


def function_name(fn: Union[str, Callable]) -> str:
    """The name calls are matched by: ``"softmax"`` for ``torch.softmax``, ``F.softmax`` and
    ``Tensor.softmax``; ``"matmul"`` for ``torch.matmul`` and ``@`` (``Tensor.__matmul__``); ``"add"``
    for ``torch.add`` and ``+``; in-place forms keep their underscore (``"add_"``)."""
    name = fn if isinstance(fn, str) else getattr(fn, "__name__", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"fn must be a torch function or its name, got {fn!r}")
    if name.startswith("__") and name.endswith("__") and len(name) > 4:
        name = name[2:-2]
    return name


def _own_call(forward_code: Any) -> bool:
    """Whether the torch call being handled comes from the module's own forward code (or helpers it
    calls), not from a module called inside it (a child, a hook point, a hook): walking up from here, the
    wrapper's frame comes before any ``nn.Module.__call__``."""
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if code is forward_code:
            return True
        if code in _CALL_IMPL_CODES:
            return False
        frame = frame.f_back
    return False


_TORCH_DIR = torch.__file__.rsplit("/", 1)[0]


def _caller_line() -> str:
    """``file:line: source`` of the innermost frame outside torch and this file (where the call was written)."""
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename.startswith(_TORCH_DIR)
                                 or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    if frame is None:
        return ""
    src = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
    return f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno}: {src}"


class _CallMode(TorchFunctionMode):
    """Active while one module's forward runs: counts its own calls of each function and passes the
    chosen ones' results through their hook points (or records every call, for ``function_calls``)."""

    def __init__(self, wrapped: "_WrappedForward") -> None:
        super().__init__()
        self.wrapped = wrapped
        self.counts: Dict[str, int] = {}

    def __torch_function__(self, func: Callable, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name.startswith("__") and name.endswith("__") and len(name) > 4:
            name = name[2:-2]
        w = self.wrapped
        if name == "get" or not (w.recording is not None or name in w.wanted):
            return out  # property reads (x.shape: Tensor.shape.__get__) are not calls
        if not _own_call(_WrappedForward.CODE):
            return out
        index = self.counts.get(name, 0)
        self.counts[name] = index + 1
        if w.recording is not None:
            leaves = tensor_leaves(out)
            w.recording.append(FunctionCall(name, index, tuple(leaves[0].shape) if leaves else None,
                                            _caller_line()))
        for point in w.wanted.get(name, {}).get(index, ()):
            out = point(out)
        return out


class _WrappedForward:
    """``module.forward`` replaced by an instance attribute that runs the original inside a ``_CallMode``
    (``CODE`` is the wrapper's frame code, which ``_own_call`` looks for)."""

    CODE: Any = None

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.previous = module.__dict__.get("forward")  # an instance forward already there (e.g. HF TP's)
        self.wanted: Dict[str, Dict[int, List[HookPoint]]] = {}
        self.recording: Optional[List[FunctionCall]] = None
        original = module.forward
        wrapped = self

        def forward(*args: Any, **kwargs: Any) -> Any:
            with _CallMode(wrapped):
                return original(*args, **kwargs)

        _WrappedForward.CODE = forward.__code__
        module.forward = forward

    def unwrap(self, module: Optional[nn.Module] = None) -> None:
        module = self.module if module is None else module
        if self.previous is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = self.previous


@dataclass(frozen=True)
class FunctionCall:
    """One torch function call in a module's own forward: matched by ``name``; ``index``: the how-many-th
    call of that name (from 0); ``shape`` of its first tensor result; ``line`` where it was written when
    (``file:line: source``)."""

    name: str
    index: int
    shape: Optional[Tuple[int, ...]]
    line: str = ""

    def __str__(self) -> str:
        return f"{self.name + '[' + str(self.index) + ']':<28} {str(self.shape):<20} {self.line}".rstrip()


class FunctionCalls(list):
    """``flex.function_calls(...)``: a list of ``FunctionCall``, printed one per line."""

    def __str__(self) -> str:
        return "\n".join(str(c) for c in self)


@dataclass(eq=False)
class Intermediate:
    """A named value inside ``module``'s forward: the result of the ``index``-th call of ``fn``."""

    name: str
    module_name: str
    fn: str
    index: int
    point: HookPoint


# == 3. standard names =======================================================================================
_FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "decoder.final_layer_norm")


def _child(module: nn.Module, name: str) -> Optional[nn.Module]:
    sub = module
    for part in name.split("."):
        sub = getattr(sub, "_modules", {}).get(part)
        if sub is None:
            return None
    return sub


def _find_blocks(base: nn.Module) -> Optional[Tuple[str, nn.ModuleList]]:
    """The shallowest ModuleList under ``base`` whose every item holds an HF attention module."""
    best: Optional[Tuple[str, nn.ModuleList]] = None
    for name, sub in base.named_modules():
        if isinstance(sub, nn.ModuleList) and len(sub) and all(
                any(is_hf_attention(m) for m in block.modules()) for block in sub):
            if best is None or name.count(".") < best[0].count("."):
                best = (name, sub)
    return best


def _block_parts(block: nn.Module) -> Tuple[Dict[str, Tuple[str, str]], Optional[str]]:
    """``({alias suffix: (child name in the block, side)}, the attention child's name)`` for one block."""
    children = dict(block.named_children())
    attn = next((n for n, m in children.items() if is_hf_attention(m)), None)
    parts: Dict[str, Tuple[str, str]] = {}
    sandwich = "post_feedforward_layernorm" in children  # Gemma 2/3, OLMo 2: a norm after each sublayer
    if attn is not None:
        parts["attn_out"] = ("post_attention_layernorm" if sandwich and "post_attention_layernorm" in children
                             else attn, "output")
    if sandwich:
        parts["mlp_out"] = ("post_feedforward_layernorm", "output")
    elif "mlp" in children:
        parts["mlp_out"] = ("mlp", "output")
    flat = "fc2" in children and "mlp" not in children  # OPT: its MLP runs on (batch * seq, hidden) rows
    parallel = getattr(block, "use_parallel_residual", False) is True  # GPT-NeoX: attn and mlp read resid_pre
    post_ln = getattr(getattr(block, "config", None), "do_layer_norm_before", True) is False  # OPT-350m
    mid = next((n for n in ("pre_feedforward_layernorm", "ln_2", "final_layer_norm") if n in children), None)
    if mid is None and not sandwich and "post_attention_layernorm" in children:
        mid = "post_attention_layernorm"  # Llama family, GPT-NeoX: the norm before the MLP
    if mid is not None and not parallel and not post_ln and not flat:
        parts["resid_mid"] = (mid, "input")
    return parts, attn


def standard_aliases(resolver: NameResolver) -> List[Alias]:
    """The standard names of a HuggingFace causal LM (or its base model) in ``resolver``'s model; [] for
    a model without HF transformer blocks."""
    canon_of = {id(resolver.modules[c][1]): c for c in resolver.module_names()}
    tops = [c for c in resolver.module_names()
            if hasattr(resolver.modules[c][1], "base_model_prefix") and hasattr(resolver.modules[c][1], "config")]
    if not tops:
        return []
    top_name = min(tops, key=lambda c: (c.count(".") if c else -1))
    top = resolver.modules[top_name][1]
    base = getattr(top, "base_model", top)
    base = base if isinstance(base, nn.Module) else top
    found = _find_blocks(base)
    if found is None:
        return []
    blocks_path, blocks = found
    out: List[Alias] = []

    def add(alias: str, module: Optional[nn.Module], side: str, doc: str) -> None:
        if module is not None and id(module) in canon_of:
            out.append(Alias(alias, canon_of[id(module)], side, doc))

    emb = top.get_input_embeddings() if hasattr(top, "get_input_embeddings") else None
    add("embed", emb if isinstance(emb, nn.Module) else None, "output",
        "token embeddings (the embedding module's output)")
    for key, block in blocks._modules.items():
        b = f"blocks.{key}"
        add(f"{b}.resid_pre", block, "input", "residual stream into the block (batch, seq, hidden)")
        parts, attn = _block_parts(block)
        docs = {"attn_out": "what the attention sublayer adds to the residual stream",
                "mlp_out": "what the MLP sublayer adds to the residual stream",
                "resid_mid": "residual stream between the attention and MLP sublayers"}
        for suffix in ("attn_out", "resid_mid", "mlp_out"):
            if suffix in parts:
                child, side = parts[suffix]
                add(f"{b}.{suffix}", block._modules[child], side, docs[suffix])
        add(f"{b}.resid_post", block, "output", "residual stream out of the block (before the final norm)")
        if attn is not None and id(block._modules[attn]) in canon_of:
            attn_name = canon_of[id(block._modules[attn])]
            for point in ATTENTION_POINTS:
                out.append(Alias(f"{b}.attn.{point}", f"{attn_name}.{point}", "output", ATTENTION_DOCS[point]))
    norm = next((m for m in (_child(base, n) for n in _FINAL_NORMS) if m is not None), None)
    add("ln_final", norm, "output", "the final norm's output")
    head = top.get_output_embeddings() if hasattr(top, "get_output_embeddings") else None
    add("unembed", head if isinstance(head, nn.Module) else None, "output",
        "logits (the LM head's output, before any final logit soft-capping)")
    return out


ATTENTION_DOCS = {
    "q": "queries (batch, heads, query, head dim), after rotary embeddings",
    "k": "keys (batch, kv heads, key, head dim), after rotary embeddings and the cache",
    "v": "values (batch, kv heads, key, head dim)",
    "scores": "attention scores before softmax (batch, heads, query, key): scaled, soft-capped, masked",
    "pattern": "attention pattern after softmax (batch, heads, query, key), before dropout",
    "z": "per-head output before the output projection (batch, query, heads, head dim)",
}


# == the per-FlexModel state =================================================================================
class HookPoints:
    """What one FlexModel installed: attention hook points, named intermediates, and the aliases.

    Attention hook points are installed on every HF attention module of the model at once, lazily: the
    first time a name needs them (a hook on ``...self_attn.pattern`` or on an alias of one), or by
    ``install()`` (``flex.add_hook_points()``). ``uninstall()`` (``flex.restore()``) takes everything
    away again."""

    def __init__(self, root: nn.Module, resolver: NameResolver) -> None:
        self.root, self.resolver = root, resolver
        self.attention: Dict[str, nn.Module] = {c: resolver.modules[c][1] for c in resolver.module_names()
                                                if is_hf_attention(resolver.modules[c][1])}
        self._attention_names = frozenset(self.attention_names())
        self.installed = False
        self._saved: List[Tuple[Any, Any]] = []  # (config, its _attn_implementation_internal before install)
        self.intermediates: Dict[str, Intermediate] = {}
        self._wrapped: Dict[int, _WrappedForward] = {}  # id(module) -> its wrapped forward
        # a module of the model that happens to bear a standard name keeps it: that alias is left out
        resolver.add_aliases(a for a in standard_aliases(resolver)
                             if a.name not in resolver.modules or a.name in resolver.points)

    # -- names ---------------------------------------------------------------------------
    def attention_names(self) -> List[str]:
        """Every attention hook point name of the model, installed or not."""
        return [f"{a}.{p}" for a in self.attention for p in ATTENTION_POINTS]

    def fallback_matches(self, match: Callable[[str], bool]) -> List[str]:
        """What ``create_hook_group`` matches when its pattern matches no module name: the aliases it
        matches, then the attention hook points not installed yet that it matches (less those an alias
        already matched stands for)."""
        aliases = [n for n in self.resolver.alias_names() if match(n)]
        if self.installed:
            return aliases
        taken = {self.resolver.aliases[n].target for n in aliases}
        return aliases + [n for n in self.attention_names() if match(n) and n not in taken]

    def _needs_attention(self, name: str) -> bool:
        alias = self.resolver.alias(name)
        target = alias.target if alias is not None else name
        return not self.installed and target in self._attention_names

    def prepare(self, name: str, hook_type: str) -> str:
        """Install what ``name`` needs; the hook type to register on its target (an alias names a value:
        "forward"/"forward_pre" mean the value, "full_backward"/"full_backward_pre" its gradient)."""
        if isinstance(name, str) and self._needs_attention(name):
            self.install()
        alias = self.resolver.alias(name)
        if alias is None:
            return hook_type
        if hook_type not in VALUE_KINDS + GRAD_KINDS:
            raise ValueError(f'"{name}" is an alias for a value ({self.resolver.display(name)}); hook it as '
                             f'"forward" (the value) or "full_backward_pre" (its gradient), not {hook_type!r}')
        value = hook_type in VALUE_KINDS
        if alias.side == "input":
            return "forward_pre" if value else "full_backward"
        return "forward" if value else "full_backward_pre"

    # -- attention -------------------------------------------------------------------------
    def install(self, eager: bool = False) -> List[str]:
        """Attention hook points on every HF attention module (idempotent; ``eager``: always compute eager
        math, also when scores / pattern are not hooked). Returns their names."""
        if not self.attention:
            raise ValueError("the model has no HuggingFace attention module that calls transformers' attention "
                             "registry (ALL_ATTENTION_FUNCTIONS); attention hook points need one. For a value "
                             "inside any module's forward, use flex.hook_point(module_name, name, fn=...)")
        if self.installed:
            for module in self.attention.values():
                module.__dict__[POINTS_ATTRIBUTE].eager = eager or module.__dict__[POINTS_ATTRIBUTE].eager
            return self.attention_names()
        if any(POINTS_ATTRIBUTE in vars(m) for m in self.attention.values()):
            raise ValueError("attention hook points are already installed on this model by another FlexModel; "
                             "restore() that wrapper first (one wrapper at a time owns them)")
        register_attention()
        configs: Dict[int, Any] = {}
        for module in self.attention.values():
            configs.setdefault(id(module.config), module.config)
        self._saved = [(c, c.__dict__.get("_attn_implementation_internal")) for c in configs.values()]
        points: Dict[str, Tuple[str, nn.Module]] = {}
        for name, module in self.attention.items():
            real = self.resolver.modules[name][0]
            state = AttentionPoints(attention_points(module), module.config._attn_implementation, eager)
            for p, point in state.points.items():
                points[f"{name}.{p}"] = (f"{real}.{p}" if real else p, point)
            module.__dict__[POINTS_ATTRIBUTE] = state
        try:
            self.resolver.add_points(points)
        except ValueError:
            for module in self.attention.values():
                module.__dict__.pop(POINTS_ATTRIBUTE, None)
            raise
        for config, _ in self._saved:
            config._attn_implementation_internal = ATTENTION_IMPLEMENTATION
        self.installed = True
        return self.attention_names()

    def uninstall_attention(self) -> None:
        if not self.installed:
            return
        for config, before in self._saved:
            config._attn_implementation_internal = before
        for module in self.attention.values():
            module.__dict__.pop(POINTS_ATTRIBUTE, None)
        self.resolver.remove_points(self.attention_names())
        self._saved, self.installed = [], False

    # -- named intermediates ---------------------------------------------------------------------
    def add_intermediate(self, module_name: str, name: str, fn: Union[str, Callable], index: int = 0,
                         tp_dim: Optional[int] = None) -> str:
        """A hook point ``f"{module_name}.{name}"`` on the result of the ``index``-th call of ``fn`` in the
        module's own forward; returns that name."""
        real, module = self.resolver.module(module_name)
        if self.resolver.alias(module_name) is not None:
            raise ValueError(f'"{module_name}" is an alias; name the module itself')
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"a hook point name is one identifier (letters, digits, _), got {name!r}")
        if not isinstance(index, int) or index < 0:
            raise ValueError(f"index counts calls from 0, got {index!r}")
        canon = self.resolver.canonical.get(real, module_name)
        full = f"{canon}.{name}" if canon else name
        fn_name = function_name(fn)
        point = HookPoint(f"{fn_name}[{index}]", {"output": tp_dim, "input": tp_dim} if tp_dim is not None else None)
        self.resolver.add_points({full: (f"{real}.{name}" if real else name, point)})
        wrapped = self._wrapped.get(id(module))
        if wrapped is None:
            wrapped = self._wrapped[id(module)] = _WrappedForward(module)
        wrapped.wanted.setdefault(fn_name, {}).setdefault(index, []).append(point)
        self.intermediates[full] = Intermediate(full, canon, fn_name, index, point)
        return full

    def function_calls(self, module_name: str, run: Callable[[], Any]) -> FunctionCalls:
        """Every torch function call in the module's own forward during ``run()`` (its first call)."""
        _, module = self.resolver.module(module_name)
        wrapped = self._wrapped.get(id(module))
        temporary = wrapped is None
        if temporary:
            wrapped = _WrappedForward(module)
        calls: List[FunctionCall] = []
        wrapped.recording = calls
        done = module.register_forward_hook(lambda *a: setattr(wrapped, "recording", None), always_call=True)
        try:
            run()
        finally:
            done.remove()
            wrapped.recording = None
            if temporary:
                wrapped.unwrap()
        return FunctionCalls(calls)

    def uninstall(self) -> None:
        """Everything away: attention points (configs back), intermediates (forwards back), their names."""
        self.uninstall_attention()
        for wrapped in self._wrapped.values():
            wrapped.unwrap()
        self.resolver.remove_points(list(self.intermediates))
        self._wrapped.clear()
        self.intermediates.clear()

    def strip_copy(self, memo: Dict[int, Any]) -> None:
        """Undo on a deep copy (``memo``: ``copy.deepcopy``'s) what ``install`` and ``add_intermediate`` did
        on the original: configs' implementations back, points and wrapped forwards gone."""
        for config, before in self._saved:
            copied = memo.get(id(config))
            if copied is not None:
                copied._attn_implementation_internal = before
        if self.installed:
            for module in self.attention.values():
                copied = memo.get(id(module))
                if copied is not None:
                    copied.__dict__.pop(POINTS_ATTRIBUTE, None)
        for key, wrapped in self._wrapped.items():
            copied = memo.get(key)
            if copied is not None:
                wrapped.unwrap(copied)

    def summary(self) -> str:
        """One line for ``describe()``: what is installed ("" when nothing is)."""
        parts = []
        if self.installed:
            parts.append(f"attention ({', '.join(ATTENTION_POINTS)}) on {len(self.attention)} modules, "
                         f"implementation {ATTENTION_IMPLEMENTATION!r}")
        if self.intermediates:
            parts.append("intermediates " + ", ".join(f"{n} = {i.fn}[{i.index}]"
                                                      for n, i in self.intermediates.items()))
        return "; ".join(parts)

    # -- the dry run ----------------------------------------------------------------------------
    def shapes(self, run: Callable[[], Any], full_shape: Callable[[str, nn.Module, str, Any, Any], Any]
               ) -> "HookPointMap":
        """Run ``run()`` once with plain recording hooks on every module and hook point; the shape of the
        first tensor of each name's value (``full_shape(name, module, side, value, hook handle)`` turns a
        local value into the full shape)."""
        temporary = not self.installed and bool(self.attention)
        if temporary:
            self.install()
        seen: Dict[Tuple[str, str], Any] = {}
        handles: List[Any] = []
        inputs_needed = {a.target for a in self.resolver.aliases.values() if a.side == "input"}

        def recorder(name: str, module: nn.Module, side: str) -> None:
            handle: Any = None

            def record(value: Any) -> None:
                if (name, side) not in seen:
                    seen[(name, side)] = full_shape(name, module, side, value, handle.id)

            if side == "output":
                handle = module.register_forward_hook(lambda m, a, o: record(o))
            else:
                handle = module.register_forward_pre_hook(lambda m, a, k: record((a, k)), with_kwargs=True)
            handles.append(handle)

        try:
            for name in self.resolver.module_names():
                module = self.resolver.modules[name][1]
                recorder(name, module, "output")
                if name in inputs_needed:
                    recorder(name, module, "input")
            with torch.no_grad():
                run()
        finally:
            for h in handles:
                h.remove()
            names = self.resolver.module_names()
            points = set(self.resolver.points)
            aliases = dict(self.resolver.aliases)
            if temporary:
                self.uninstall_attention()
        result = HookPointMap()
        for name in names:
            result[name] = seen.get((name, "output"))
        result.points = points
        for alias_name in sorted(aliases, key=_natural):
            a = aliases[alias_name]
            result[alias_name] = seen.get((a.target, a.side))
        result.aliases = {n: a for n, a in aliases.items()}
        return result


def full_shape(layout: Any, name: str, module: nn.Module, side: str, value: Any, hook_id: int
               ) -> Optional[Tuple[int, ...]]:
    """The full shape of the first tensor of a hooked ``value`` seen on this rank: its local shape with
    the dims split over tp and dp (as ``flex_model.placement`` reads them) at full size (dp slices taken as
    even); the local shape where placement cannot tell."""
    from flex_model.placement import LocalValue, infer_placement, is_dtensor, to_local

    leaves = tensor_leaves(value)
    if not leaves:
        return None
    leaf = leaves[0]
    if layout.tp == 1 and layout.dp == 1:
        return tuple(leaf.shape)
    local, dtensor_dim, _ = to_local(leaf)
    try:
        placement = infer_placement(LocalValue(name, module, side, local, from_dtensor=is_dtensor(leaf),
                                               dtensor_tp_dim=dtensor_dim, hook_id=hook_id, hooked=value), layout)
    except ValueError:
        return tuple(local.shape)
    shape = list(local.shape)
    if placement.tp_dim is not None:
        shape[placement.tp_dim] *= layout.tp
    if placement.dp_dim is not None:
        shape[placement.dp_dim] *= layout.dp
    return tuple(shape)


def _natural(name: str) -> List[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


class HookPointMap(dict):
    """``flex.hook_points(...)``: every name a hook can go on -> the shape of its value's first tensor for
    that input (None: it did not run, or held no tensor); ``str()`` prints it as a tree (modules with their
    hook points, then the aliases and what they stand for)."""

    points: set = set()
    aliases: Dict[str, Alias] = {}

    def __str__(self) -> str:
        lines = []
        modules = [n for n in self if n not in self.aliases]
        for name in sorted(modules, key=_natural):
            depth = name.count(".") + 1 if name else 0
            label = name.rsplit(".", 1)[-1] if name else "(root)"
            if name in self.points:
                label += "  [hook point]"
            lines.append(f"{'  ' * depth}{label:<{max(1, 44 - 2 * depth)}} {_fmt(self[name])}")
        if self.aliases:
            lines.append("aliases:")
            for name in sorted(self.aliases, key=_natural):
                a = self.aliases[name]
                where = f"{name} -> {a.target}{' (input)' if a.side == 'input' else ''}"
                lines.append(f"  {where:<62} {_fmt(self[name])}")
        return "\n".join(lines)


def _fmt(shape: Any) -> str:
    return "-" if shape is None else str(tuple(shape))
