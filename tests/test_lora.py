"""LoRA (issue 2, part 5) and the freeze pass.

For each rewrite: structure (the ops created per adapted layer, provenance on every created
node), match count (adapters == layers the plan selects), numerical equivalence. ``peft`` is
the oracle: with the same A and B (our ``adapter_state_dict`` loaded into a peft model), outputs
and merged weights match PEFT's LoRA on Llama (linear + embedding), GPT-2 (Conv1D,
``fan_in_fan_out``), BERT and a CNN (conv2d, strided and 1x1).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import graphpeft as gp
from graphpeft.graph import Role, op_count
from graphpeft.passes import InsertLoRA

from conftest import ARCHS, created_nodes, max_diff

aten = torch.ops.aten

# per architecture: extra targets on top of the arch's typical plan, and how many layers the
# plan selects (the match count)
PARITY = {
    "llama": (["embed_tokens"], 2 * 3 + 1),  # q, v, down per layer + the embedding
    "gpt2": ([], 2 * 4),  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    "bert": ([], 2 * 4),  # query, value, attention.output.dense, output.dense per layer
    "cnn": ([], 4),  # layer1.conv2, layer2.conv1 (stride 2), layer2.down.0 (1x1, stride 2), fc
}
R, ALPHA = 4, 8


def lora_plan(name: str, **options) -> gp.Plan:
    extra, _ = PARITY[name]
    return gp.Plan([gp.LoRA(targets=list(ARCHS[name].targets) + extra, r=R, alpha=ALPHA, **options)])


@pytest.fixture(scope="module")
def parity_case():
    """name -> (base model, compiled model with random A and B, peft model with the same A and B)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    cache: dict = {}

    def get(name: str):
        if name not in cache:
            arch = ARCHS[name]
            model = arch.build()
            args, kwargs = arch.inputs()
            cm = gp.compile(model, lora_plan(name, init="random"), example_inputs=args, example_kwargs=kwargs)
            cm.eval()
            cfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(arch.peft_targets) + PARITY[name][0],
                             fan_in_fan_out=arch.fan_in_fan_out, init_lora_weights=False)
            pm = get_peft_model(copy.deepcopy(model), cfg)
            loaded = set_peft_model_state_dict(
                pm, {"base_model.model." + k: v for k, v in cm.adapter_state_dict().items()})
            assert not loaded.unexpected_keys
            assert not [k for k in loaded.missing_keys if "lora_" in k]
            pm.eval()
            cache[name] = (model, cm, pm)
        return cache[name]

    return get


# --- structure, match count, provenance ------------------------------------------------------


def expected_ops(kind: str, conv=None, dropout: bool = False) -> list:
    if kind == "embedding":
        return [aten.t.default, aten.embedding.default, aten.linear.default, aten.mul.Tensor, aten.add.Tensor]
    mm = conv if kind == "conv" else aten.linear.default
    return [aten.dropout.default] * dropout + [mm, mm, aten.mul.Tensor, aten.add.Tensor]


@pytest.mark.parametrize("name", list(PARITY))
def test_structure_match_count_and_provenance(parity_case, name):
    model, cm, _ = parity_case(name)
    gm = cm.graph_module
    adapters = cm.adapters()
    # match count: one adapter per selected layer, and the rewrite pass reports the same
    assert len(adapters) == PARITY[name][1]
    ok = [m for m in cm.match_report() if m.ok]
    assert sorted(m.origin for m in ok) == sorted(adapters)
    assert all(m.stage == "rewrite" for m in ok)
    assert op_count(gm) == cm.base_op_count + sum(5 if a["kind"] == "embedding" else 4 for a in adapters.values())
    modules = dict(model.named_modules())
    for path, rec in adapters.items():
        nodes = created_nodes(gm, path)
        calls = [n.target for n in nodes if n.op == "call_function"]
        conv = aten.conv2d.default if rec["kind"] == "conv" else None
        assert calls == expected_ops(rec["kind"], conv), path
        attrs = sorted(n.target for n in nodes if n.op == "get_attr")
        assert attrs == sorted(rec["tensors"].values())
        for n in nodes:  # provenance on every created node
            prov = n.meta["graphpeft"]
            assert prov["pass_name"] == "insert_lora" and prov["rule"] == rec["rule"]
            assert prov["origin"] == prov["adapter"] == path
            assert list(n.meta["nn_module_stack"].values())[-1][0] == path
            assert "val" in n.meta
        # shapes as PEFT has them
        a, b = (gm.get_parameter(rec["tensors"][k]) for k in ("A", "B"))
        base = modules[path]
        if rec["kind"] == "embedding":
            assert (a.shape, b.shape) == ((R, base.num_embeddings), (base.embedding_dim, R))
        elif rec["kind"] == "conv":
            assert a.shape == (R, base.in_channels, *base.kernel_size) and b.shape == (base.out_channels, R, 1, 1)
        else:
            assert a.shape[0] == R and b.shape[1] == R
        assert rec["scaling"] == ALPHA / R
    # nothing else was created
    assert len(created_nodes(gm)) == sum(len(created_nodes(gm, p)) for p in adapters)


def test_gpt2_conv1d_branch_reads_the_addmm_input(parity_case):
    _, cm, _ = parity_case("gpt2")
    rec = cm.adapters()["transformer.h.0.attn.c_attn"]
    assert rec["fan_in_fan_out"]
    nodes = {n.name: n for n in cm.graph_module.graph.nodes}
    join = nodes[rec["join"]]
    base = join.args[0]
    assert base.target == aten.addmm.default
    (low,) = [n for n in created_nodes(cm.graph_module, rec["layer"]) if n.target == aten.linear.default][:1]
    assert low.args[0] is base.args[1]  # x of addmm(bias, x, W)


def test_explain_lists_matched_and_unmatched_layers_with_reasons(parity_case):
    _, cm, _ = parity_case("llama")
    text = cm.explain()
    assert text.splitlines()[0].startswith("plan: 1 rule(s); 7 adapter(s);")
    assert "  + model.layers.0.self_attn.q_proj (linear Linear 32->32): lora[" in text
    assert "  + model.embed_tokens (embedding Embedding 128->32): lora[" in text
    assert "  - model.layers.0.self_attn.k_proj (linear Linear 32->16): lora[" in text
    assert "path does not match targets" in text
    assert sum(line.startswith("  + ") for line in text.splitlines()) == 7
    assert sum(line.startswith("  - ") for line in text.splitlines()) == 16 - 7


@pytest.fixture(scope="module")
def llama_trace():
    arch = ARCHS["llama"]
    args, kwargs = arch.inputs()
    return arch.build(), gp.trace(arch.build(), args, kwargs)


def test_insert_lora_negative_no_match(llama_trace):
    _, tr = llama_trace
    gm = copy.deepcopy(tr.gm)
    code, ops = gm.code, op_count(gm)
    p = InsertLoRA([gp.LoRA(targets=["nothing_here"], r=2)])
    result = gp.PassManager().run(gm, [p])
    assert p.match_count() == 0 and not result.modified
    assert result.gm.code == code and op_count(result.gm) == ops and not created_nodes(result.gm)
    assert len(p.results) == 16  # every layer reported, with its reason
    assert all(not m.ok and m.stage == "match" and "path does not match" in m.reason for m in p.results)


def test_insert_lora_declines_at_check_with_reasons(llama_trace):
    _, tr = llama_trace
    gm = copy.deepcopy(tr.gm)
    p = InsertLoRA([gp.LoRA(targets=["k_proj", "q_proj"], r=20)])  # k_proj is 32 -> 16
    with pytest.warns(gp.GraphPeftWarning, match=r"r=20 on model.layers.0.self_attn.k_proj is larger than the "
                                                 r"layer \(32 -> 16\): allowed, as in PEFT"):
        gp.PassManager().run(gm, [p])  # PEFT allows r > min(in, out): a warning, not a refusal
    assert p.match_count() == 4 and not [m for m in p.results if m.stage == "check"]
    # a second run over the same graph declines every layer that already has an adapter
    again = InsertLoRA([gp.LoRA(targets=["q_proj"], r=2)])
    result = gp.PassManager().run(gm, [again])
    assert again.match_count() == 0 and not result.modified
    assert [m.reason for m in again.results if m.stage == "check"] == ["the layer already has an adapter"] * 2


# --- parity with peft ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PARITY))
def test_outputs_match_peft(parity_case, parity, name):
    model, cm, pm = parity_case(name)
    args, kwargs = ARCHS[name].inputs()
    with torch.no_grad():
        ours, theirs, base = cm(*args, **kwargs), pm(*args, **kwargs), model(*args, **kwargs)
    assert max_diff(ours, base) > 1e-3  # the adapters are not the identity
    assert parity.record(f"peft outputs {name}", max_diff(ours, theirs)) <= 1e-5


@pytest.mark.parametrize("name", list(PARITY))
def test_merged_weights_match_peft(parity_case, parity, name):
    _, cm, pm = parity_case(name)
    ours = cm.merge().graph_module.state_dict()
    theirs = copy.deepcopy(pm).merge_and_unload().state_dict()
    adapted = [rec["weight"] for rec in cm.adapters().values()]
    assert all(w in ours and w in theirs for w in adapted)
    base = cm.graph_module.state_dict()
    assert all(float((ours[w] - base[w]).abs().max()) > 1e-3 for w in adapted)  # the merge did something
    diffs = [float((ours[k] - theirs[k]).abs().max()) for k in ours if k in theirs]
    assert len(diffs) >= len(adapted)
    assert parity.record(f"peft merged weights {name}", max(diffs)) <= 1e-5


def test_rslora_scaling_matches_peft():
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    x = torch.randn(2, 16)
    plain = gp.compile(model, gp.Plan([gp.LoRA(targets=["2"], r=4, alpha=8, init="random")]), example_inputs=(x,))
    rs = gp.compile(model, gp.Plan([gp.LoRA(targets=["2"], r=4, alpha=8, init="random", use_rslora=True)]),
                    example_inputs=(x,))
    assert plain.adapters()["2"]["scaling"] == 8 / 4
    assert rs.adapters()["2"]["scaling"] == 8 / math.sqrt(4)
    with torch.no_grad():
        base, y_plain, y_rs = model(x), plain(x), rs(x)
    # same A and B (same seed and layer), branch scaled by alpha/sqrt(r) = 2 x alpha/r
    assert torch.allclose(y_rs - base, 2 * (y_plain - base), atol=1e-6)
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["2"], use_rslora=True))
    set_peft_model_state_dict(pm, {"base_model.model." + k: v for k, v in rs.adapter_state_dict().items()})
    with torch.no_grad():
        assert max_diff(rs(x), pm(x)) <= 1e-6


# --- initialisation ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"emb": torch.nn.Embedding(64, 64), "lin": torch.nn.Linear(64, 64)})

    class Wide(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, ids):
            return self.m["lin"](self.m["emb"](ids))

    return Wide().eval(), torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))


def factors(cm, path):
    rec = cm.adapters()[path]
    return (cm.graph_module.get_parameter(rec["tensors"]["A"]).detach(),
            cm.graph_module.get_parameter(rec["tensors"]["B"]).detach())


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_init_leaves_outputs_unchanged(wide, init):
    model, ids = wide
    r = 8
    cm = gp.compile(model, gp.Plan([gp.LoRA(targets=["lin", "emb"], r=r, init=init)]), example_inputs=(ids,))
    with torch.no_grad():
        assert torch.equal(cm(ids), model(ids))  # B = 0 (A = 0 for the embedding)
    a, b = factors(cm, "m.lin")
    assert torch.count_nonzero(b) == 0
    if init == "default":  # Kaiming-uniform with a=sqrt(5): |A| <= 1/sqrt(fan_in)
        assert a.abs().max() <= 1 / math.sqrt(64) + 1e-7 and a.std() > 0.5 / math.sqrt(3 * 64)
    else:  # normal with std 1/r
        assert abs(float(a.std()) - 1 / r) < 0.15 / r and abs(float(a.mean())) < 0.1 / r
    ea, eb = factors(cm, "m.emb")
    assert torch.count_nonzero(ea) == 0 and abs(float(eb.std()) - 1.0) < 0.2  # PEFT: A zero, B normal


def test_init_is_seeded_per_layer(wide):
    model, ids = wide
    plan = gp.Plan([gp.LoRA(targets=["lin"], r=4)])
    a0, _ = factors(gp.compile(model, plan, example_inputs=(ids,)), "m.lin")
    a0_again, _ = factors(gp.compile(model, plan, example_inputs=(ids,)), "m.lin")
    a1, _ = factors(gp.compile(model, plan, example_inputs=(ids,), seed=1), "m.lin")
    assert torch.equal(a0, a0_again) and not torch.equal(a0, a1)


# --- fresh adapters, dropout on the branch only, train / eval ------------------------------------


@pytest.fixture(scope="module")
def llama_dropout():
    arch = ARCHS["llama"]
    model = arch.build()
    args, kwargs = arch.inputs()
    cm = gp.compile(model, gp.Plan([gp.LoRA(targets=["q_proj", "v_proj"], r=4, dropout=0.5)]),
                    example_inputs=args, example_kwargs=kwargs)
    return model, cm, args, kwargs


def test_dropout_structure(llama_dropout):
    _, cm, _, _ = llama_dropout
    assert len(cm.adapters()) == 4
    for path in cm.adapters():
        nodes = created_nodes(cm.graph_module, path)
        assert [n.target for n in nodes if n.op == "call_function"] == expected_ops("linear", dropout=True)
        (drop,) = [n for n in nodes if n.target == aten.dropout.default]
        assert drop.args[1] == 0.5 and drop.meta["graphpeft"]["part"] == "dropout"
        # the dropout reads the layer's input, and only the adapter branch reads the dropout
        assert all("graphpeft" in u.meta for u in drop.users)


def test_fresh_adapters_leave_outputs_unchanged_in_train_and_eval(llama_dropout):
    model, cm, args, kwargs = llama_dropout
    with torch.no_grad():
        base = model(*args, **kwargs)
        for mode in (True, False):
            cm.train(mode)
            # B = 0: equal to the base model even in train mode, so dropout is not on the base path
            assert max_diff(cm(*args, **kwargs), base) == 0.0
    cm.eval()


def test_dropout_random_in_train_deterministic_in_eval(llama_dropout):
    model, cm, args, kwargs = llama_dropout
    saved = cm.adapter_state_dict()
    g = torch.Generator().manual_seed(0)
    cm.load_adapter_state_dict({k: torch.randn(v.shape, generator=g) * 0.5 for k, v in saved.items()})
    try:
        with torch.no_grad():
            cm.train()
            assert cm.training
            t1, t2 = cm(*args, **kwargs), cm(*args, **kwargs)
            assert max_diff(t1, t2) > 1e-4  # dropout active on the branch
            cm.eval()
            assert not cm.training
            e1, e2 = cm(*args, **kwargs), cm(*args, **kwargs)
            assert max_diff(e1, e2) == 0.0
            assert max_diff(e1, model(*args, **kwargs)) > 1e-4
            cm.train(True)
            cm.train(False)  # toggling back gives the same eval graph
            assert max_diff(cm(*args, **kwargs), e1) == 0.0
    finally:
        cm.load_adapter_state_dict(saved)
        cm.eval()


# --- freeze, gradients, trainable parameters ---------------------------------------------------------


def test_only_adapters_are_trainable_and_get_gradients(parity_case):
    model, cm, _ = parity_case("llama")
    gm = cm.graph_module
    trainable = cm.trainable_parameters()
    adapter_names = {t for rec in cm.adapters().values() for t in rec["tensors"].values()}
    assert set(trainable) == adapter_names
    assert all(cm.roles()[n] == Role.ADAPTER for n in trainable)
    assert {n for n, p in gm.named_parameters() if p.requires_grad} == adapter_names
    assert all(p is gm.get_parameter(n) for n, p in trainable.items())
    assert cm.num_parameters(True) == sum(p.numel() for p in trainable.values())
    assert cm.num_parameters(True) == 2 * (4 * (32 + 32) + 4 * (32 + 16) + 4 * (64 + 32)) + 4 * (128 + 32)
    args, kwargs = ARCHS["llama"].inputs()
    cm.train()
    try:
        out = cm(*args, **kwargs)
        out.logits.pow(2).mean().backward()
        for n, p in gm.named_parameters():
            if n in adapter_names:
                assert p.grad is not None and p.grad.abs().sum() > 0, n
            else:
                assert p.grad is None, n
        assert all(p.grad is None for p in model.parameters())  # the user's model is not touched
    finally:
        cm.zero_grad(set_to_none=True)
        cm.eval()


def test_an_optimizer_step_changes_only_adapters(wide):
    model, ids = wide
    before = copy.deepcopy(model.state_dict())
    cm = gp.compile(model, gp.Plan([gp.LoRA(targets=["lin"], r=4)]), example_inputs=(ids,))
    frozen = {n: t.clone() for n, t in cm.graph_module.state_dict().items() if "lora" not in n}
    adapters = {n: t.detach().clone() for n, t in cm.trainable_parameters().items()}
    opt = torch.optim.SGD(cm.trainable_parameters().values(), lr=0.1)
    cm(ids).pow(2).mean().backward()
    opt.step()
    after = cm.graph_module.state_dict()
    assert all(torch.equal(after[n], t) for n, t in frozen.items())
    assert any(not torch.equal(after[n], t) for n, t in adapters.items())
    assert all(torch.equal(model.state_dict()[n], t) for n, t in before.items())
    assert all(p.requires_grad for p in model.parameters())  # the user's model keeps its flags
