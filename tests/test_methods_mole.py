"""MoLE (MixLoRA-style top-k routed LoRA experts): structure, match count and provenance,
parity with a plain PyTorch reference (a sparse, token-gathering MoE wrapper around the HF
layers) on Llama and GPT-2, the router logits and the load-balancing loss (Switch / Mixtral), the
merge behaviour (mergeable adapters fold, routed experts stay), ONNX inference export with the
router, and the training step (loss falls, the router trains, onnxruntime runs the same step).

peft has no MoLE, hence the reference. Random inputs and randomised routers: no ties in top-k,
so torch and onnxruntime select the same experts."""

from __future__ import annotations

import math

import pytest
import torch

import graphpeft as gp
from graphpeft.errors import AdapterError, PassError, PlanError
from graphpeft.graph import find_layers, get_tensor, iter_created, op_count
from graphpeft.infra import PassContext, PassManager, clone_graph_module
from graphpeft.passes.adapters.insert_mole import (forward_with_router_logits, init_tensors, load_balancing_loss,
                                          router_aux_loss)

from method_helpers import (IDS, assert_loss_falls, check_onnx, check_structure, check_training_export,
                            compiled_fixture, created_ops, llama_paths, randomize, run)
from models import tiny_gpt2, tiny_llama

E, K, R = 4, 2, 2
LLAMA = dict(targets=["gate_proj", "up_proj", "down_proj"], num_experts=E, top_k=K, r=R, alpha=4.0, dropout=0.0,
             init="random")
GPT2_MOLE = dict(targets=["c_fc", "mlp.c_proj"], num_experts=E, top_k=K, r=R, dropout=0.0, init="random")
BRANCH = ["linear", "softmax", "topk", "getitem", "getitem", "sum", "div", "zeros_like", "scatter",  # router
          "view", "linear", "unflatten", "unsqueeze", "mul", "flatten", "view", "linear", "mul", "add"]  # experts


def randomize_moderately(cm: gp.CompiledModel) -> None:
    """``randomize``, with routers of std 1/sqrt(in): logits of order one, so the router's
    softmax is not saturated (saturated probabilities tie at zero in top-k)."""
    randomize(cm)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in cm.trainable_parameters().items():
            if name.endswith("mole_router"):
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))


llama = compiled_fixture("llama", [gp.MoLE(**LLAMA)], randomizer=randomize_moderately)
# a LoRA beside the routed experts: merge folds the one and keeps the other
gpt2 = compiled_fixture("gpt2", [gp.LoRA(targets=["c_attn"], r=2, init="random"), gp.MoLE(**GPT2_MOLE)],
                        randomizer=randomize_moderately)


# --- the reference: a plain PyTorch MoE of LoRA experts around the HF layer -------------------------


class ReferenceMoLE(torch.nn.Module):
    """MixLoRA's routing written the sparse way (tokens gathered per expert, index_add back),
    independent of the dense graph: softmax, top-k, renormalise, Σ w_e · s · B_e A_e x."""

    def __init__(self, base: torch.nn.Module, router: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 top_k: int, scaling: float) -> None:
        super().__init__()
        self.base, self.router, self.a, self.b = base, router, a, b
        self.top_k, self.scaling = top_k, scaling
        self.logits: torch.Tensor = torch.empty(0)
        self.delta: torch.Tensor = torch.empty(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        flat = x.reshape(-1, x.shape[-1])
        self.logits = flat @ self.router.T
        probs = torch.softmax(self.logits, dim=-1)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        out = torch.zeros(flat.shape[0], y.shape[-1])
        for e in range(self.router.shape[0]):
            tokens, slot = torch.where(idx == e)
            h = (flat[tokens] @ self.a[e].T) @ self.b[:, e].T * self.scaling
            out.index_add_(0, tokens, h * w[tokens, slot, None])
        self.delta = out
        return y + out.reshape(y.shape)


def reference_model(make, cm: gp.CompiledModel) -> tuple[torch.nn.Module, dict[str, ReferenceMoLE]]:
    """The HF model with every MoLE layer of ``cm`` wrapped by :class:`ReferenceMoLE` (same
    tensors); other adapters of ``cm`` (the LoRA) are applied as PEFT-free merges."""
    model = make()
    wrappers = {}
    gm = cm.graph_module
    for path, rec in cm.adapters().items():
        parent_path, leaf = path.rsplit(".", 1)
        parent = model.get_submodule(parent_path)
        if rec["method"] == "mole":
            t = {k: get_tensor(gm, v).detach() for k, v in rec["tensors"].items()}
            wrappers[path] = ReferenceMoLE(getattr(parent, leaf), t["router"], t["A"], t["B"], rec["top_k"],
                                           rec["scaling"])
            setattr(parent, leaf, wrappers[path])
        else:  # LoRA: W += s·BA (Conv1D stores W as (in, out))
            delta = get_tensor(gm, rec["tensors"]["B"]).detach() @ get_tensor(gm, rec["tensors"]["A"]).detach()
            delta = (delta.T if rec["fan_in_fan_out"] else delta) * rec["scaling"]
            with torch.no_grad():
                getattr(parent, leaf).weight.add_(delta)
    return model.eval(), wrappers


# --- tests -----------------------------------------------------------------------------------------


def test_structure_roles_and_match_count(llama):
    paths = llama_paths("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    check_structure(llama, paths, "insert_mole", "mole[gate_proj,up_proj,down_proj]")
    for p in paths:
        ops = [o if o != "<built-in function getitem>" else "getitem" for o in created_ops(llama, p)]
        assert ops == BRANCH
        reads = sorted(n.target for n in iter_created(llama.graph_module, p) if n.op == "get_attr")
        assert reads == sorted(f"{p}.mole_{t}" for t in ("router", "lora_A", "lora_B"))
    roles = llama.roles()
    rec = llama.adapters()["model.layers.0.mlp.down_proj"]
    assert all(roles[t] == gp.Role.ADAPTER for t in rec["tensors"].values())
    assert (rec["num_experts"], rec["top_k"], rec["scaling"]) == (E, K, 2.0)
    sd = llama.adapter_state_dict()
    assert sd["model.layers.0.mlp.down_proj.mole_router"].shape == (E, 64)
    assert sd["model.layers.0.mlp.down_proj.mole_lora_A"].shape == (E, R, 64)
    assert sd["model.layers.0.mlp.down_proj.mole_lora_B"].shape == (32, E, R)
    # per layer E·in (router) + E·r·in (A) + out·E·r (B): gate/up 32->64, down 64->32
    per = lambda i, o: E * i + E * R * i + o * E * R  # noqa: E731
    assert llama.num_parameters(trainable_only=True) == 2 * (2 * per(32, 64) + per(64, 32))


def test_published_defaults_and_identity_init(llama):
    rule = gp.MoLE(targets=["up_proj"])
    assert (rule.num_experts, rule.top_k, rule.r, rule.alpha, rule.dropout) == (8, 2, 8, 16.0, 0.05)
    assert (rule.router_init_range, rule.router_aux_loss_coef, rule.scaling) == (0.02, 0.01, 2.0)
    layer = next(l for l in find_layers(llama.graph_module) if l.path == "model.layers.0.mlp.up_proj")
    t = init_tensors(layer, rule, seed=0)
    assert t["router"].shape == (8, 32) and 0.012 < float(t["router"].std()) < 0.028  # normal, std 0.02
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=√5) per expert: fan-in = in, as LoRA's A
    assert t["A"].shape == (8, 8, 32) and float(t["A"].abs().max()) <= bound and float(t["A"].std()) > 0.5 * bound / math.sqrt(3)
    assert t["B"].shape == (64, 8, 8) and not t["B"].any()
    # B zero: the fresh adapter is the identity, whatever the router does
    saved = llama.adapter_state_dict()
    try:
        llama.load_adapter_state_dict({k: torch.zeros_like(v) if k.endswith("lora_B") else v for k, v in saved.items()})
        with torch.no_grad():
            assert (run(llama, "llama") - run(tiny_llama(), "llama")).abs().max().item() == 0
    finally:
        llama.load_adapter_state_dict(saved)


def test_rejections(llama):
    for bad, match in [(dict(top_k=3, num_experts=2), "top_k=3 is larger than num_experts=2"),
                       (dict(num_experts=0), "num_experts must be a positive integer"),
                       (dict(top_k=0), "top_k must be a positive integer"),
                       (dict(r=0), "r must be a positive integer"),
                       (dict(dropout=1.0), "dropout must be in"),
                       (dict(alpha="x"), "alpha must be a number"),
                       (dict(router_init_range=-1.0), "must be >= 0"),
                       (dict(init="zeros"), "init must be one of")]:
        with pytest.raises(PlanError, match=match):
            gp.MoLE(targets=["up_proj"], **bad)
    with pytest.raises(PlanError, match="top_k=9 is larger"):
        gp.Plan.from_dict([{"mole": {"targets": ["up_proj"], "top_k": 9}}])
    with pytest.raises(PlanError, match="unknown option"):
        gp.Plan.from_dict([{"mole": {"targets": ["up_proj"], "experts": 4}}])
    layers = {l.path: l for l in find_layers(llama.graph_module)}
    with pytest.raises(PlanError, match="does not support embedding"):
        gp.Plan([gp.MoLE(targets=["embed_tokens"])]).resolve(list(layers.values()))
    assert "rank r=64 is larger" in gp.MoLE(targets=["up_proj"], r=64).check(layers["model.layers.0.mlp.up_proj"])
    assert gp.Plan.from_dict([{"mole": LLAMA}]) == llama.plan


@pytest.mark.parametrize("arch,make", [("llama", tiny_llama), ("gpt2", tiny_gpt2)])
def test_reference_parity(arch, make, request, parity):
    cm = request.getfixturevalue(arch)
    ref, wrappers = reference_model(make, cm)
    with torch.no_grad():
        ours, theirs = run(cm, arch), run(ref, arch)
    assert all(w.delta.abs().max() > 1e-2 for w in wrappers.values())  # the experts change every layer
    assert parity.record(f"mole {arch} vs reference", (ours - theirs).abs().max().item()) < 1e-5


def test_router_logits_and_load_balancing_loss(llama):
    ref, wrappers = reference_model(tiny_llama, llama)
    with torch.no_grad():
        run(ref, "llama")
        out, logits = forward_with_router_logits(llama, IDS, use_cache=False)
        assert torch.equal(out.logits, llama(IDS, use_cache=False).logits)
    assert set(logits) == set(llama.adapters())
    for path, w in wrappers.items():
        torch.testing.assert_close(logits[path].reshape(-1, E), w.logits, rtol=1e-4, atol=1e-4)
    lb = load_balancing_loss(list(logits.values()), K)
    # Switch / Mixtral: E · Σ_e (tokens choosing e / tokens) · mean router probability of e
    flat = torch.cat([t.reshape(-1, E) for t in logits.values()])
    probs = torch.softmax(flat, dim=-1)
    counts = torch.bincount(probs.topk(K, dim=-1).indices.flatten(), minlength=E)
    torch.testing.assert_close(lb, E * (counts / flat.shape[0] * probs.mean(dim=0)).sum())
    # the auxiliary loss trains the routers (eager training)
    _, aux = router_aux_loss(llama, IDS, use_cache=False)
    torch.testing.assert_close(aux, 0.01 * lb)
    aux.backward()
    params = llama.trainable_parameters()
    try:
        assert all(params[f"{p}.mole_router"].grad.abs().max() > 0 for p in llama.adapters())
    finally:
        for p in params.values():
            p.grad = None


def test_onnx_inference_with_the_router(llama, tmp_path, parity):
    from graphpeft.backends.onnx import OnnxRunner, max_abs_diff

    # dynamic shapes: the router, top-k and expert reshapes follow batch and sequence length
    parity.record("mole llama onnxruntime unmerged", check_onnx(llama, str(tmp_path / "mole.onnx"), merged=False))
    ids = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = list(llama.graph_module(ids))
    assert max_abs_diff(OnnxRunner(str(tmp_path / "mole.onnx")).run([ids]), expected) < 1e-4


def test_merge_folds_lora_and_keeps_routed_experts(gpt2, tmp_path, parity):
    moles = sorted(p for p, r in gpt2.adapters().items() if r["method"] == "mole")
    loras = sorted(p for p, r in gpt2.adapters().items() if r["method"] == "lora")
    assert len(moles) == 4 and len(loras) == 2
    merged = gpt2.merge()
    assert sorted(merged.adapters()) == moles
    mole_ops = sum(len(created_ops(gpt2, p)) for p in moles)
    assert op_count(merged.graph_module) == gpt2.base_op_count + mole_ops
    assert set(merged.trainable_parameters()) == {t for p in moles for t in gpt2.adapters()[p]["tensors"].values()}
    with torch.no_grad():
        diff = (run(merged, "gpt2") - run(gpt2, "gpt2")).abs().max().item()
    assert parity.record("mole gpt2 merge (LoRA folded, MoLE kept)", diff) < 1e-5
    # the merge pass alone refuses, saying what to do
    with pytest.raises(PassError, match="merged=False"):
        PassManager().run(clone_graph_module(gpt2.graph_module), [gp.passes.MergeAdapters()], PassContext())
    # export_onnx(merged=True) folds the LoRA and exports the router with the model
    parity.record("mole gpt2 onnxruntime merged", check_onnx(gpt2, str(tmp_path / "merged.onnx"), merged=True))


def test_adapter_file_roundtrip(llama, tmp_path):
    saved = llama.adapter_state_dict()
    llama.save_adapter(tmp_path / "adapter")
    try:
        llama.load_adapter_state_dict({k: torch.zeros_like(v) for k, v in saved.items()})
        gp.load_adapter(llama, tmp_path / "adapter")
        assert all(torch.equal(v, saved[k]) for k, v in llama.adapter_state_dict().items())
    finally:
        llama.load_adapter_state_dict(saved)


def test_training_step_loss_falls_router_trains_and_onnxruntime_agrees(gpt2, tmp_path, parity):
    # start as published (router std 0.02, A Kaiming, B zero; LoRA B zero): a fresh adapter
    saved = gpt2.adapter_state_dict()
    layers = {l.path: l for l in find_layers(gpt2.graph_module)}
    start = dict(saved)
    for path, rec in gpt2.adapters().items():
        if rec["method"] == "mole":
            fresh = init_tensors(layers[path], gp.MoLE(**{**GPT2_MOLE, "init": "default"}), seed=0)
            start.update({rec["tensors"][k]: v for k, v in fresh.items()})
        else:
            start[rec["tensors"]["B"]] = torch.zeros_like(saved[rec["tensors"]["B"]])
    # lockstep: onnxruntime runs each of the first 3 steps from torch's state. (Free-running
    # trajectories drift apart over many steps: a token near a top-k boundary routes differently.)
    result = check_training_export(gpt2, gp.optim.SGD(lr=0.1, momentum=0.9), tmp_path, steps=8, compared=3,
                                   start=start, lockstep=True)
    loss_diff = parity.record("mole gpt2 train step onnxruntime loss", result.loss_diff)
    param_diff = parity.record("mole gpt2 train step onnxruntime params", result.param_diff)
    assert loss_diff < 1e-5 and param_diff < 1e-5
    assert_loss_falls(result.torch_losses, by=0.1)
    for p, rec in gpt2.adapters().items():
        if rec["method"] == "mole":
            router = rec["tensors"]["router"]
            assert (result.final[router] - start[router]).abs().max() > 1e-5, p  # the router got gradients


def test_fusing_a_routed_adapter_is_refused(llama):
    # last: it gives the shared model an adapter bank (nothing else changes: fuse checks first)
    with torch.no_grad():
        before = run(llama, "llama")
    with pytest.raises(AdapterError, match="cannot be fused"):
        llama.fuse_adapter("default")
    assert llama.fused_adapter is None
    with torch.no_grad():
        assert torch.equal(run(llama, "llama"), before)
