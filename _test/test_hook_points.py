"""``flex_model.hook_points``: attention internals of HF models, named intermediates, standard names, the dry run.

Every value is checked against the model itself: hidden states from ``output_hidden_states=True``, attention
weights from an eager model's ``output_attentions=True``, head ablations against zeroed weights, gradients
against ``torch.autograd.grad``. Tiny configs (2 layers, width 32) of every architecture that builds without
downloads; TP=2 on two real gloo ranks at the end (a torch TP plan, and transformers' ``tp_plan="auto"``).
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, List

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

from _test.distributed import multi_process, run_ranks
from _test.models import save_hf_llama, tiny_gpt
from flex_model import FlexModel, HookFunction
from flex_model.hook_points import ATTENTION_IMPLEMENTATION, ATTENTION_POINTS, POINTS_ATTRIBUTE, HookPoint
from flex_model.layout import ParallelLayout
from flex_model.placement import LocalValue, infer_placement

torch.set_num_threads(1)
transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64)


def _configs() -> Dict[str, Callable[[], nn.Module]]:
    T = transformers
    return {
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**COMMON, num_key_value_heads=2)),
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=4)),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**COMMON, num_key_value_heads=2)),
        "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(**COMMON, num_key_value_heads=2, head_dim=8)),
        "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**COMMON, num_key_value_heads=2, head_dim=8,
                                                             sliding_window=4, attn_logit_softcapping=5.0,
                                                             final_logit_softcapping=None)),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                                       bos_token_id=0, eos_token_id=0)),
        "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**COMMON)),
        "opt": lambda: T.OPTForCausalLM(T.OPTConfig(vocab_size=97, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                                    num_attention_heads=4, max_position_embeddings=64,
                                                    word_embed_proj_dim=32, pad_token_id=1, bos_token_id=0,
                                                    eos_token_id=0)),
    }


ARCHS = list(_configs())
IDS = torch.randint(2, 97, (2, 7), generator=torch.Generator().manual_seed(0))
MASK = torch.ones(2, 7, dtype=torch.long)
MASK[1, :2] = 0  # left padding in the second row: the attention mask must reach the attention function
VALID = MASK.bool()


def real(x: torch.Tensor, seq_dim: int = 1) -> torch.Tensor:
    """The rows of real tokens: at padded query positions (no key to attend to) SDPA's and eager's results
    differ, and neither means anything."""
    x = x.movedim(seq_dim, 1)
    return x[VALID]


def close(got: torch.Tensor, want: torch.Tensor, seq_dim: int = 1, **kw) -> None:
    assert got.shape == want.shape, (got.shape, want.shape)
    assert_close(real(got, seq_dim), real(want, seq_dim), **kw)


def build(arch: str, impl: str = "sdpa", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = _configs()[arch]()
    with torch.no_grad():  # larger weights than HF's init, so that edits and patterns are far from uniform
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    try:
        model.set_attn_implementation(impl)
    except ValueError:  # Gemma 2 has no SDPA path (soft-capping): it runs eager
        model.set_attn_implementation("eager")
    with torch.no_grad():  # HF installs its output-capturing hooks in the first pass: before any snapshot
        model.eval()(IDS[:, :2], output_hidden_states=True)
    return model


def snapshot(model: nn.Module):
    return ([n for n, _ in model.named_modules()], list(model.state_dict()), repr(model),
            {n: sorted(vars(m)) for n, m in model.named_modules()})


def capture(flex: FlexModel, names: List[str], *args, **kwargs) -> Dict[str, torch.Tensor]:
    hooks = [HookFunction(n) for n in names]
    handles = [flex.register(h) for h in hooks]
    flex.clear_output_dict()
    out = flex(*args, **kwargs)
    got = {n: flex.output_dict[n][0] for n in names}
    for h in handles:
        h.remove()
    got["_out"] = out
    return got


# == standard names, per architecture ==========================================================================
@pytest.mark.parametrize("arch", ARCHS)
def test_aliases_equal_the_models_own_values(arch):
    """resid_pre[i] = hidden_states[i], resid_post[i] = hidden_states[i+1] (the last: before the final norm),
    resid_pre + attn_out = resid_mid, resid_mid + mlp_out = resid_post, embed, ln_final, unembed = logits."""
    model = build(arch)
    before = snapshot(model)
    with torch.no_grad():
        ref = model(IDS, attention_mask=MASK, output_hidden_states=True)
    hs, n = ref.hidden_states, model.config.num_hidden_layers
    flex = FlexModel(model, {})
    names = list(flex.aliases())
    assert {"embed", "ln_final", "unembed", "blocks.0.resid_pre", "blocks.1.resid_post", "blocks.1.attn.pattern",
            "blocks.0.attn_out"} <= set(names), names
    assert ("blocks.0.mlp_out" in names) == (arch != "opt")  # OPT's MLP runs on flattened rows: no alias
    assert ("blocks.0.resid_mid" in names) == (arch not in ("opt", "gpt_neox"))
    with torch.no_grad():
        got = capture(flex, names, IDS, attention_mask=MASK)
    close(got["_out"].logits, ref.logits)  # hook points installed: the same model
    close(got["embed"], model.get_input_embeddings()(IDS))
    for i in range(n):
        b = f"blocks.{i}"
        close(got[f"{b}.resid_pre"], hs[i])
        if i < n - 1:
            close(got[f"{b}.resid_post"], hs[i + 1])
        if f"{b}.resid_mid" in got:
            close(got[f"{b}.resid_pre"] + got[f"{b}.attn_out"], got[f"{b}.resid_mid"])
            close(got[f"{b}.resid_mid"] + got[f"{b}.mlp_out"], got[f"{b}.resid_post"])
        elif f"{b}.mlp_out" in got:  # GPT-NeoX's parallel residual
            close(got[f"{b}.resid_pre"] + got[f"{b}.attn_out"] + got[f"{b}.mlp_out"], got[f"{b}.resid_post"])
    last = got[f"blocks.{n - 1}.resid_post"]
    close(got["ln_final"], hs[n])  # HF's last hidden state is after the final norm
    close(flex.get_module("ln_final")(last), hs[n])
    close(got["unembed"], ref.logits)
    flex.restore()
    assert snapshot(model) == before


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_points_match_eager_attentions_and_sdpa(arch):
    """pattern = the eager model's output_attentions, layer by layer; q/k/v/scores/pattern/z hooked on an sdpa
    model and on an eager model are the same; shapes follow HF's conventions; the model's output is
    unchanged while the points are installed, and everything is put back by restore()."""
    eager = build(arch, "eager")
    with torch.no_grad():
        ref = eager(IDS, attention_mask=MASK, output_attentions=True)
    values = {}
    for impl in ("sdpa", "eager"):
        model = build(arch, impl)
        before, impl_before = snapshot(model), model.config._attn_implementation
        flex = FlexModel(model, {})
        names = [f"blocks.{i}.attn.{p}" for i in range(2) for p in ATTENTION_POINTS]
        with torch.no_grad():
            got = capture(flex, names, IDS, attention_mask=MASK)
        assert model.config._attn_implementation == ATTENTION_IMPLEMENTATION
        assert snapshot(model)[:3] == before[:3]  # modules, state_dict keys, repr: unchanged while installed
        close(got["_out"].logits, ref.logits)
        values[impl] = got
        flex.restore()
        assert model.config._attn_implementation == impl_before and snapshot(model) == before
    heads, kv = eager.config.num_attention_heads, getattr(eager.config, "num_key_value_heads", None) or 4
    for i in range(2):
        b = f"blocks.{i}.attn"
        close(values["sdpa"][f"{b}.pattern"], ref.attentions[i], seq_dim=2)
        assert values["sdpa"][f"{b}.pattern"].shape == (2, heads, 7, 7)
        assert values["sdpa"][f"{b}.q"].shape == (2, heads, 7, 8) and values["sdpa"][f"{b}.k"].shape == (2, kv, 7, 8)
        assert values["sdpa"][f"{b}.z"].shape == (2, 7, heads, 8)
        for p in ATTENTION_POINTS:
            assert_close(values["sdpa"][f"{b}.{p}"], values["eager"][f"{b}.{p}"], msg=lambda m, p=p: f"{b}.{p}: {m}")


def test_z_head_ablation_equals_zeroed_o_proj_columns():
    """An edit on one head of z (the per-head output) is the same model as zeroing that head's columns of
    o_proj; an edit on the pattern (uniform attention on one head) changes the output."""
    model = build("llama")
    ablated = copy.deepcopy(model)
    with torch.no_grad():
        for layer in ablated.model.layers:
            layer.self_attn.o_proj.weight[:, 2 * 8:3 * 8] = 0
        want = ablated(IDS).logits

    def zero_head(module, z, save_ctx, modules):
        z = z.clone()
        z[:, :, 2] = 0
        return z

    flex = FlexModel(model, {})
    flex.create_hook_group("z", r"^blocks\.\d+\.attn\.z$", editing_function=zero_head, regex=True)
    with torch.no_grad():
        assert_close(flex(IDS).logits, want)
        plain = flex(IDS, groups="z", complement=True).logits
    assert not torch.allclose(plain, want)
    flex.restore()


def test_every_hook_kind_and_gradients_on_points_and_aliases():
    """forward_pre on q, full_backward_pre on the pattern (= autograd's gradient of the pattern), an alias's
    gradient (resid_post: full_backward_pre; resid_pre: full_backward under the hood), and an edit in the
    graph: the loss's gradient flows through it into a trainable scale."""
    model = build("llama")
    out = {}
    flex = FlexModel(model, out)
    flex.register_trainable_module("scale", nn.Linear(1, 1, bias=False))
    nn.init.constant_(flex.trainable_modules["scale"].weight, 1.0)
    seen = {}

    def keep(key):
        def edit(module, x, save_ctx, modules):
            seen[key] = x
        return edit

    def scaled(module, x, save_ctx, modules):
        return x * modules["scale"].weight[0, 0]

    flex.register(HookFunction("model.layers.0.self_attn.pattern", editing_function=keep("pattern")))
    flex.register(HookFunction("model.layers.0.self_attn.pattern"), "full_backward_pre")
    flex.register(HookFunction("model.layers.1.self_attn.q"), "forward_pre")
    flex.register(HookFunction("blocks.0.resid_post", editing_function=keep("resid_post")))
    flex.register(HookFunction("blocks.0.resid_post"), "backward_pre")
    flex.register(HookFunction("blocks.1.resid_pre"), "full_backward")
    flex.register(HookFunction("blocks.1.attn.z", editing_function=scaled))
    text = flex.describe()
    assert "blocks.1.resid_pre -> model.layers.1 (input)" in text and "full_backward " in text
    assert "hook points: attention" in text
    loss = flex(IDS).logits.pow(2).mean()
    grads = torch.autograd.grad(loss, [seen["pattern"], seen["resid_post"]], retain_graph=True)
    loss.backward()
    assert_close(out["model.layers.0.self_attn.pattern"][1], grads[0])  # [0] is the forward capture
    assert_close(out["blocks.0.resid_post"][1], grads[1])
    assert_close(out["blocks.1.resid_pre"][0], grads[1])  # the same value: block 0's output is block 1's input
    assert out["model.layers.1.self_attn.q"][0].shape == (2, 4, 7, 8)
    assert flex.trainable_modules["scale"].weight.grad is not None
    with pytest.raises(ValueError, match="alias for a value"):
        flex.register(HookFunction("blocks.0.resid_post"), "tensor")
    flex.restore()


def test_groups_names_and_errors():
    """A group pattern is tried on module names first, then on aliases, then on hook points not installed yet;
    add_hook_points() makes the points ordinary names; unknown names suggest aliases."""
    model = build("gpt2")
    flex = FlexModel(model, {})
    assert [h.module_name for h in flex.create_hook_group("pat", "attn.pattern")] == \
        ["blocks.0.attn.pattern", "blocks.1.attn.pattern"]
    assert [h.module_name for h in flex.create_hook_group("mlp", "mlp_out")] == ["blocks.0.mlp_out", "blocks.1.mlp_out"]
    assert [h.module_name for h in flex.create_hook_group("loose", "h.1.mlp")] == \
        ["transformer.h.1.mlp", "transformer.h.1.mlp.act", "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj",
         "transformer.h.1.mlp.dropout"]  # module names match first: no alias joins them
    flex.add_hook_points()
    assert "transformer.h.0.attn.scores" in flex.wrapped_module_names
    assert isinstance(flex.get_module("transformer.h.0.attn.scores"), HookPoint)
    assert flex.get_module("blocks.0.resid_pre") is model.transformer.h[0]
    with pytest.raises(ValueError, match="blocks.0.resid_pre"):
        flex.register(HookFunction("blocks.0.resid_pr"))
    flex.restore()
    with pytest.raises(ValueError, match="no HuggingFace attention module"):
        FlexModel(tiny_gpt(), {}).add_hook_points()
    assert FlexModel(tiny_gpt(), {}).aliases() == {}


def test_copy_without_hooks_is_the_plain_model():
    model = build("qwen2")
    flex = FlexModel(model, {})
    flex.register(HookFunction("blocks.0.attn.pattern", editing_function=lambda m, x, s, t: x * 0 + 1 / 7))
    flex.hook_point("model.layers.1", "resid_mid", "add", 0)
    with torch.no_grad():
        edited = flex(IDS).logits
        plain = flex.copy_without_hooks()
        assert plain.config._attn_implementation == "sdpa" and plain.model.config._attn_implementation == "sdpa"
        assert all(POINTS_ATTRIBUTE not in vars(m) and "forward" not in vars(m) for m in plain.modules())
        want = build("qwen2")(IDS).logits
        assert_close(plain(IDS).logits, want)
        assert not torch.allclose(edited, want)
        assert_close(flex(IDS).logits, edited)  # the original keeps its points and hooks
    flex.restore()


def test_points_under_generate_with_a_cache():
    """HF generate with its KV cache: the same tokens; each decode step's pattern is (batch, heads, 1, keys):
    Mistral's sliding-window cache (window 4) keeps 4 keys."""
    model = build("mistral")
    with torch.no_grad():
        want = model.generate(IDS[:, :4], attention_mask=MASK[:, :4] * 0 + 1, max_new_tokens=3, do_sample=False)
    out = {}
    flex = FlexModel(model, out)
    flex.register(HookFunction("blocks.1.attn.pattern"))
    with torch.no_grad():
        got = model.generate(IDS[:, :4], attention_mask=MASK[:, :4] * 0 + 1, max_new_tokens=3, do_sample=False)
    assert torch.equal(got, want)
    assert [tuple(t.shape) for t in out["blocks.1.attn.pattern"]] == [(2, 4, 4, 4), (2, 4, 1, 4), (2, 4, 1, 4)]
    flex.restore()


def test_hook_point_on_a_functional_call():
    """flex.hook_point(module, name, fn, index): the index-th own call of fn in that module's forward (calls
    in submodules do not count); every hook kind works on it; restore() puts forward back."""
    model = tiny_gpt()
    idx = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(1))
    out = {}
    flex = FlexModel(model, out)
    calls = flex.function_calls("layers.0", idx)
    assert [(c.name, c.index) for c in calls] == [("add", 0), ("add", 1)]  # ln1/attn/ln2/mlp's own ops: not here
    assert "x = x + self.attn(self.ln1(x))" in str(calls)
    attn_calls = [(c.name, c.index, c.shape) for c in flex.function_calls("layers.1.attn", idx)]
    assert ("softmax", 0, (2, 4, 6, 6)) in attn_calls and ("matmul", 1, (2, 4, 6, 8)) in attn_calls
    mid = flex.hook_point("layers.0", "resid_mid", "add", 0)
    pattern = flex.hook_point("layers.1.attn", "pattern", torch.softmax)  # matches Tensor.softmax too
    assert (mid, pattern) == ("layers.0.resid_mid", "layers.1.attn.pattern")
    flex.register(HookFunction(mid))
    flex.register(HookFunction("layers.0.ln2"), "forward_pre")
    flex.register(HookFunction(pattern, editing_function=lambda m, x, s, t: x * 0 + torch.ones_like(x).tril() /
                               torch.arange(1, 7).view(6, 1)))  # uniform causal attention
    flex.register(HookFunction(pattern), "full_backward_pre")
    logits = flex(idx)
    logits.sum().backward()
    assert_close(out[mid][0], out["layers.0.ln2"][0])
    assert out[pattern][0].shape == (2, 4, 6, 6) and out[pattern][1].shape == (2, 4, 6, 6)
    flex.restore()
    assert all("forward" not in vars(m) for m in model.modules())
    with torch.no_grad():
        assert not torch.allclose(model(idx), logits)
    flex = FlexModel(model, {})
    with pytest.raises(ValueError, match="identifier"):
        flex.hook_point("layers.0", "a.b", "add")


def test_hook_point_intermediate_equals_alias_on_llama():
    model = build("llama")
    flex = FlexModel(model, {})
    name = flex.hook_point("model.layers.0", "resid_mid", "add", 0)
    with torch.no_grad():
        got = capture(flex, [name, "blocks.0.resid_mid"], IDS)
    assert_close(got[name], got["blocks.0.resid_mid"])
    flex.restore()


def test_hook_points_dry_run():
    """flex.hook_points(...): every module, hook point and alias with its value's shape, from one pass in which
    no registered hook fires; the points it installed for that are taken away again."""
    model = build("llama")
    out = {}
    flex = FlexModel(model, out)
    flex.register(HookFunction("model.layers.0.mlp"))
    flex.add_hook_points()
    flex.restore()  # a second wrapper, the points not installed: the dry run installs them for itself
    flex = FlexModel(model, out)
    flex.register(HookFunction("model.layers.0.mlp"))
    shapes = flex.hook_points(IDS)
    assert out == {} and model.config._attn_implementation == "sdpa"
    assert shapes["model.layers.1.self_attn.pattern"] == (2, 4, 7, 7)
    assert shapes["model.layers.1.self_attn.k"] == (2, 2, 7, 8)
    assert shapes["blocks.1.attn.z"] == (2, 7, 4, 8)
    assert shapes["blocks.0.resid_pre"] == shapes["blocks.1.resid_post"] == (2, 7, 32)
    assert shapes["unembed"] == shapes[""] == (2, 7, 97)
    assert shapes["model.layers"] is None  # a ModuleList never runs
    text = str(shapes)
    assert "pattern  [hook point]" in text and "blocks.0.resid_pre -> model.layers.0 (input)" in text
    flex(IDS)
    assert list(out) == ["model.layers.0.mlp"]
    flex.restore()


# == placement: the head dim declared by a hook point ==========================================================
def test_declared_head_dim_placement():
    """A hook point declares its head dim and the full head count: a 1/tp slice of the heads is split over tp
    there, all the heads are whole, any other count is an error naming the sizes."""
    tp2 = ParallelLayout(tp=2, ranks=(0, 1))
    point = HookPoint("pattern", {"output": (1, 4), "input": (1, 4)})
    split = infer_placement(LocalValue("p", point, "output", torch.zeros(2, 2, 7, 7), hooked=torch.zeros(2, 2, 7, 7)),
                            tp2)
    assert split.tp_dim == 1
    whole = infer_placement(LocalValue("p", point, "output", torch.zeros(2, 4, 7, 7)), tp2)
    assert whole.tp_dim is None
    grad = infer_placement(LocalValue("p", point, "input", torch.zeros(2, 2, 7, 7), is_grad=True), tp2)
    assert grad.tp_dim == 1
    with pytest.raises(ValueError, match="full size"):
        infer_placement(LocalValue("p", point, "output", torch.zeros(2, 3, 7, 7)), tp2)
    z = HookPoint("z", {"output": 2})  # a dim without a size: taken as split
    assert infer_placement(LocalValue("z", z, "output", torch.zeros(2, 7, 2, 8)), tp2).tp_dim == 2


# == tensor parallel: heads split over 2 ranks ===================================================================
@multi_process(world_size=2)
def test_attention_points_tp2(rank, world_size):
    """Llama with q/k/v_proj colwise and o_proj rowwise (torch TP, plain local outputs) on 2 gloo ranks: each
    rank runs half the heads. Hooks see all heads (gathered on the head dim), an edit of head 3 lands on rank
    1, gradients and captures equal one process running the same hooks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.set_num_threads(1)
    ref_model = build("llama")
    par = build("llama")
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    plan = {}
    for i in range(2):
        for p in ("q_proj", "k_proj", "v_proj"):
            plan[f"model.layers.{i}.self_attn.{p}"] = ColwiseParallel()
        plan[f"model.layers.{i}.self_attn.o_proj"] = RowwiseParallel()
    parallelize_module(par, mesh, plan)

    def head3(module, z, save_ctx, modules):
        z = z.clone()
        z[:, :, 3] *= 3.0
        return z

    def hooks(flex):
        flex.register(HookFunction("blocks.0.attn.z", editing_function=head3))
        for name in ("blocks.0.attn.pattern", "blocks.1.attn.q", "blocks.1.attn.k", "blocks.1.attn.scores"):
            flex.register(HookFunction(name))
        flex.register(HookFunction("blocks.1.attn.pattern"), "full_backward_pre")

    want: Dict[str, List[torch.Tensor]] = {}
    alone = [dist.new_group([r]) for r in range(world_size)][rank]  # one process: the reference
    ref = FlexModel(ref_model, want, process_group=alone)
    hooks(ref)
    ref_logits = ref(IDS).logits
    ref_logits.pow(2).mean().backward()

    got: Dict[str, List[torch.Tensor]] = {}
    flex = FlexModel(par, got, device_mesh=mesh)
    hooks(flex)
    logits = flex(IDS).logits
    logits.pow(2).mean().backward()
    assert_close(logits, ref_logits)
    assert tuple(par.model.layers[0].self_attn.q_proj.weight.to_local().shape) == (16, 32)  # half the heads here
    if rank == 0:
        assert sorted(got) == sorted(want)
        for name in want:
            for g, w in zip(got[name], want[name]):
                assert g.shape == w.shape, name
                assert_close(g, w, msg=lambda m, name=name: f"{name}: {m}")
        assert got["blocks.1.attn.k"][0].shape == (2, 2, 7, 8)
    emb = par.model.embed_tokens.weight.grad
    assert_close(emb, ref_model.model.embed_tokens.weight.grad)
    shapes = flex.hook_points(IDS)
    assert shapes["blocks.0.attn.pattern"] == (2, 4, 7, 7) and shapes["model.layers.0.self_attn.q_proj"] == (2, 7, 32)
    flex.restore()
    assert par.config._attn_implementation == "sdpa"
    dist.barrier()


def _hf_tp_plan_body(rank: int, world_size: int, path: str) -> None:
    """The same checks on transformers' own TP: ``from_pretrained(path, tp_plan="auto")`` at TP=2 (q/k/v colwise,
    o_proj rowwise, each replaced forward HF's), wrapped with nothing passed."""
    import warnings

    from transformers import LlamaForCausalLM

    torch.set_num_threads(1)
    idx = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(3))
    alone = [dist.new_group([r]) for r in range(world_size)][rank]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tp_plan.*deprecated", category=FutureWarning)
        par = LlamaForCausalLM.from_pretrained(path, tp_plan="auto").eval()
    ref_model = LlamaForCausalLM.from_pretrained(path).eval()
    assert par.model.layers[0].self_attn.q_proj.weight.to_local().shape[0] == 16  # 2 of the 4 heads here
    before = snapshot(par)

    def head3(module, z, save_ctx, modules):
        z = z.clone()
        z[:, :, 3] = z[:, :, 3] * 2 + 1
        return z

    def hooks(flex):
        flex.register(HookFunction("blocks.1.attn.z", editing_function=head3))
        flex.register(HookFunction("blocks.1.attn.z"), "full_backward_pre")
        flex.register(HookFunction("blocks.0.attn.pattern"))
        flex.register(HookFunction("blocks.0.attn.v"))

    want: Dict[str, List[torch.Tensor]] = {}
    ref = FlexModel(ref_model, want, process_group=alone)
    hooks(ref)
    ref_logits = ref(idx).logits
    ref_logits.pow(2).mean().backward()
    got: Dict[str, List[torch.Tensor]] = {}
    flex = FlexModel(par, got)
    assert flex.layout.tp == 2
    hooks(flex)
    logits = flex(idx).logits
    logits.pow(2).mean().backward()
    assert_close(logits, ref_logits)
    if rank == 0:
        assert sorted(got) == sorted(want)
        for name in want:
            assert [g.shape for g in got[name]] == [w.shape for w in want[name]], name
            for g, w in zip(got[name], want[name]):
                assert_close(g, w, msg=lambda m, name=name: f"{name}: {m}")
    flex.restore()
    assert snapshot(par)[:3] == before[:3] and par.config._attn_implementation == "sdpa"


def test_attention_points_hf_tp_plan_auto(tmp_path):
    pytest.importorskip("accelerate")  # transformers refuses tp_plan loading without it
    run_ranks(_hf_tp_plan_body, 2, save_hf_llama(str(tmp_path / "llama")), timeout=120)
