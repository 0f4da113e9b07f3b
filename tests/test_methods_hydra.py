"""Hydra: structure, match count and provenance; parity with a plain PyTorch reference of
``y = base(x) + s·(B_p A_p x + B_s A_s base(x))`` on Llama (no bias) and GPT-2 (Conv1D, bias:
the sequential branch sees it); an exact merge into weight and bias (and with a second adapter
stacked on the same layers); ONNX inference merged and unmerged; the training step (loss falls)
and its ONNX export run by onnxruntime against torch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import graphpeft as gp
from graphpeft.errors import PlanError
from graphpeft.graph import get_tensor

from method_helpers import (MODELS, QVD, assert_loss_falls, check_merge, check_onnx_merged_and_unmerged,
                            check_structure, check_training_export, compile_model, compiled_fixture, created_ops,
                            llama_paths, randomize, run)

LLAMA = dict(targets=["q_proj", "v_proj", "down_proj"], par_r=2, seq_r=4, scale=0.5)
GPT2 = dict(targets=["c_attn", "mlp.c_proj"], par_r=2, seq_r=4)
STEPS = 5


def gpt2_with_bias() -> torch.nn.Module:
    """The tiny GPT-2 with non-zero biases (transformers initialises them to zero), so that the
    sequential branch's reading of the bias, and its merge, are tested."""
    model = MODELS["gpt2"][0]()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") and (".attn." in name or ".mlp." in name):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return model


BUILD = {"llama": MODELS["llama"][0], "gpt2": gpt2_with_bias}


def compile_arch(arch: str, rules: list) -> gp.CompiledModel:
    return compile_model(arch, rules, make=BUILD[arch])


llama = compiled_fixture("llama", [gp.Hydra(**LLAMA)])
gpt2 = compiled_fixture("gpt2", [gp.Hydra(**GPT2)], make=gpt2_with_bias)


def test_structure_roles_and_match_count(llama):
    paths = llama_paths(*QVD)
    check_structure(llama, paths, "insert_hydra", "hydra[q_proj,v_proj,down_proj]")
    for p in paths:
        assert created_ops(llama, p) == ["linear", "linear", "linear", "linear", "add", "mul", "add"]
    # the sequential branch reads the layer op's output; the parallel one the layer's input
    gm = llama.graph_module
    rec = llama.adapters()["model.layers.0.self_attn.v_proj"]
    nodes = {n.name: n for n in gm.graph.nodes}
    layer_op = nodes[rec["join"]].args[0]
    seq_a = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target == rec["tensors"]["seq_A"])
    assert next(iter(seq_a.users)).args[0] is layer_op
    sd = llama.adapter_state_dict()
    assert len(sd) == 24 and all(llama.roles()[k] == gp.Role.ADAPTER for k in sd)
    v = "model.layers.0.self_attn.v_proj"  # 32 -> 16
    assert sd[f"{v}.hydra_par.hydra_A.weight"].shape == (2, 32)
    assert sd[f"{v}.hydra_par.hydra_B.weight"].shape == (16, 2)
    assert sd[f"{v}.hydra_seq.hydra_A.weight"].shape == (4, 16)
    assert sd[f"{v}.hydra_seq.hydra_B.weight"].shape == (16, 4)
    # per layer: par_r*(in + out) + 2*seq_r*out   (q 32->32, v 32->16, down 64->32)
    assert llama.num_parameters(trainable_only=True) == 2 * ((2 * 64 + 8 * 32) + (2 * 48 + 8 * 16) + (2 * 96 + 8 * 32))


def test_defaults_and_fresh_adapter_is_identity():
    rule = gp.Hydra(targets=["c_attn"])
    assert (rule.par_r, rule.seq_r, rule.scale, rule.dropout, rule.init) == (4, 8, 1.0, 0.0, "default")
    cm = compile_arch("gpt2", [gp.Hydra(targets=["c_attn"], dropout=0.1)])
    sd = cm.adapter_state_dict()
    assert all(not v.any() for k, v in sd.items() if ".hydra_B." in k)
    assert all(v.abs().sum() > 0 for k, v in sd.items() if ".hydra_A." in k)
    cm.eval()  # adapter dropout off
    with torch.no_grad():
        assert (run(cm, "gpt2") - run(gpt2_with_bias(), "gpt2")).abs().max().item() == 0


def test_rejections(llama):
    layers = gp.find_layers(llama.graph_module)
    with pytest.raises(PlanError, match="does not support embedding"):
        gp.Plan([gp.Hydra(targets=["embed_tokens"])]).resolve(layers)
    for bad in (dict(par_r=0), dict(seq_r=1.5), dict(dropout=1.0), dict(init="gaussian"), dict(scale="x")):
        with pytest.raises(PlanError, match="hydra: "):
            gp.Hydra(targets=["q_proj"], **bad)
    rule = gp.Hydra(targets=["v_proj"], seq_r=32)  # v_proj has 16 outputs
    assert "seq_r=32 is larger" in rule.check(next(l for l in layers if l.path.endswith("0.self_attn.v_proj")))
    assert gp.Plan.from_dict([{"hydra": LLAMA}]) == llama.plan


def _reference(arch: str, cm: gp.CompiledModel) -> torch.nn.Module:
    """The base model with the published forward added by plain hooks, reading cm's tensors."""
    model = BUILD[arch]()
    modules = dict(model.named_modules())
    for rec in cm.adapters().values():
        t = {k: get_tensor(cm.graph_module, v).detach() for k, v in rec["tensors"].items()}

        def hook(mod, args, out, t=t, s=rec["scaling"]):
            par = F.linear(F.linear(args[0], t["par_A"]), t["par_B"])
            seq = F.linear(F.linear(out, t["seq_A"]), t["seq_B"])  # out = W x + b: the bias included
            return out + s * (par + seq)

        modules[rec["layer"]].register_forward_hook(hook)
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_reference_parity(arch, request, parity):
    cm = request.getfixturevalue(arch)
    with torch.no_grad():
        ours, ref = run(cm, arch), run(_reference(arch, cm), arch)
        assert (ref - run(BUILD[arch](), arch)).abs().max().item() > 1e-2  # the adapters do something
    assert parity.record(f"hydra {arch} vs reference", (ours - ref).abs().max().item()) < 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_is_exact(arch, request, parity):
    cm = request.getfixturevalue(arch)
    merged = check_merge(cm, arch)
    with torch.no_grad():
        parity.record(f"hydra {arch} merged vs unmerged", (run(merged, arch) - run(cm, arch)).abs().max().item())
    if arch == "gpt2":  # Conv1D has a bias: the sequential branch's share of it is folded in
        rec = cm.adapters()["transformer.h.0.attn.c_attn"]
        assert not torch.equal(get_tensor(merged.graph_module, rec["bias"]), get_tensor(cm.graph_module, rec["bias"]))


def test_merge_with_a_second_adapter_on_the_same_layers():
    # named adapters stack: IA3 (which rescales W and b when merged) first, Hydra on top. The
    # sequential branch reads the base layer's output, so Hydra's merge, which runs after IA3's,
    # must use W and b from before IA3 was folded in
    cm = compile_arch("gpt2", [gp.IA3(targets=["c_attn"])])
    cm.add_adapter("second", gp.Plan([gp.Hydra(targets=["c_attn"], par_r=2, seq_r=4, init="random")]))
    cm.set_adapter(["default", "second"])
    randomize(cm)
    assert [r["method"] for r in cm.adapters().values()] == ["ia3", "ia3", "hydra", "hydra"]
    check_merge(cm, "gpt2")


def test_onnx_merged_and_unmerged(gpt2, tmp_path, parity):
    check_onnx_merged_and_unmerged(gpt2, tmp_path, parity, "hydra gpt2")


def test_training_step_onnxruntime_matches_torch_and_loss_falls(gpt2, tmp_path, parity):
    # SGD: AdamW's first steps divide each gradient by its own magnitude, and here some
    # gradients of the sequential branch are ~1e-9, near eps = 1e-8, where float rounding
    # (eager, compiled and onnxruntime all differ at 1e-16) moves the update by up to 1e-4 at
    # lr 1e-2; SGD compares the graphs themselves. Onnxruntime runs the first STEPS of 12.
    result = check_training_export(gpt2, gp.optim.SGD(lr=0.5, momentum=0.9), tmp_path, steps=12, compared=STEPS)
    diff = parity.record("hydra train sgd params compiled-onnxruntime", result.param_diff)
    assert diff < 1e-5, diff
    assert result.loss_diff < 1e-5
    assert_loss_falls(result.torch_losses, by=0.05)
