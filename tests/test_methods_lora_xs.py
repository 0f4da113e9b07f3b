"""LoRA-XS and its LoRA-SB initialisation: structure, match count, roles (only the r x r core
trains), the factors against an independent SVD, the official init, LoRA-SB's factors against
an eager-PyTorch gradient of the same loss, parity with a plain PyTorch reference of the
formula on Llama and GPT-2 (Conv1D), exact merge, deterministic recompilation, adapter files,
ONNX (merged and unmerged) and a verified training step run by torch and by onnxruntime."""

from __future__ import annotations

import pytest
import torch

import graphpeft as gp
from graphpeft.errors import PlanError
from graphpeft.graph import find_layers, get_tensor

from method_helpers import (IDS, QVD, assert_loss_falls, check_merge, check_onnx_merged_and_unmerged, check_structure,
                            check_training_export, compile_model, compiled_fixture, created_ops, llama_paths, lm_loss,
                            merged_weight_error, run, weight_out_in)
from models import tiny_gpt2, tiny_llama

LLAMA = dict(targets=["q_proj", "v_proj", "down_proj"], r=4, alpha=8)
GPT2 = dict(targets=["c_attn", "mlp.c_proj"], r=4, alpha=4, init="sb", sb_lr=1e-3)


def _svd(w: torch.Tensor, r: int):
    """Top-r SVD in float64 with the sign convention the pass documents (the largest-magnitude
    entry of each left singular vector positive), written out independently."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    u, s, vh = u[:, :r], s[:r], vh[:r]
    for i in range(r):
        if u[u[:, i].abs().argmax(), i] < 0:
            u[:, i], vh[i] = -u[:, i], -vh[i]
    return u, s, vh


class ReferenceLoRAXS(torch.nn.Module):
    """The formula, written out: ``base(x) + s · ((x Aᵀ) Rᵀ) Bᵀ``."""

    def __init__(self, base: torch.nn.Module, a: torch.Tensor, b: torch.Tensor, core: torch.Tensor,
                 scaling: float) -> None:
        super().__init__()
        self.base, self.a, self.b, self.core, self.scaling = base, a, b, core, scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * ((x @ self.a.T) @ self.core.T) @ self.b.T


def _xs_reference(make, cm) -> torch.nn.Module:
    """LoRA-XS on each adapted layer with factors from an independent SVD of its weight
    (B = U_r, A = Σ_r V_rᵀ) and cm's trained core."""
    model = make()
    for path, rec in cm.adapters().items():
        base = model.get_submodule(path)
        u, s, vh = _svd(weight_out_in(base).detach(), rec["config"].get("r", 16))
        core = get_tensor(cm.graph_module, rec["tensors"]["R"]).detach()
        model.set_submodule(path, ReferenceLoRAXS(base, (s[:, None] * vh).float(), u.float(), core, rec["scaling"]))
    return model.eval()


def _sb_update(make, targets: list[str], lr: float) -> dict[str, torch.Tensor]:
    """LoRA-SB's update approximation in eager PyTorch: -lr·sign(∇W L), L the next-token loss on
    the compile's example batch, per adapted layer (out, in)."""
    model = make()
    out = model(IDS, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), IDS[:, 1:].reshape(-1))
    names = [n for n, _ in model.named_modules() if any(n.endswith("." + t) for t in targets)]
    weights = [model.get_submodule(n).weight for n in names]
    grads = torch.autograd.grad(loss, weights)
    return {n: -lr * torch.sign(weight_out_in(model.get_submodule(n), g)).double() for n, g in zip(names, grads)}


llama = compiled_fixture("llama", [gp.LoRAXS(**LLAMA, init="random")])
gpt2_sb = compiled_fixture("gpt2", [gp.LoRAXS(**GPT2)], randomizer=None)  # LoRA-SB: fresh, as the probe made it


def test_structure_roles_and_match_count(llama):
    paths = llama_paths(*QVD)
    check_structure(llama, paths, "insert_lora_xs", "lora_xs[q_proj,v_proj,down_proj]")
    roles = llama.roles()
    for path, rec in llama.adapters().items():
        assert created_ops(llama, path) == ["linear", "linear", "linear", "mul", "add"]
        assert rec["tensors"] == {"A": f"{path}.lora_A.weight", "B": f"{path}.lora_B.weight",
                                  "R": f"{path}.default_lora_latent_mapping.weight"}
        assert roles[rec["tensors"]["A"]] == roles[rec["tensors"]["B"]] == gp.Role.ADAPTER_CONST
        assert roles[rec["tensors"]["R"]] == gp.Role.ADAPTER
        assert rec["scaling"] == 2.0
    a = get_tensor(llama.graph_module, "model.layers.0.mlp.down_proj.lora_A.weight")
    b = get_tensor(llama.graph_module, "model.layers.0.mlp.down_proj.lora_B.weight")
    assert a.shape == (4, 64) and b.shape == (32, 4)
    # only the cores train: r² = 16 per layer
    assert llama.num_parameters(trainable_only=True) == 6 * 16
    assert set(llama.adapter_state_dict()) == {f"{p}.default_lora_latent_mapping.weight" for p in paths}


def test_factors_are_the_weight_svd_deterministic_and_the_official_init(llama):
    from graphpeft.passes.adapters.insert_lora_xs import lora_xs_factors

    zero = compile_model("llama", [gp.LoRAXS(**LLAMA, init="zero")])
    base = tiny_llama()
    layers = {l.path: l for l in find_layers(zero.graph_module)}
    for path, rec in zero.adapters().items():
        u, s, vh = _svd(base.get_submodule(path).weight.detach(), 4)
        a = get_tensor(zero.graph_module, rec["tensors"]["A"])
        b = get_tensor(zero.graph_module, rec["tensors"]["B"])
        torch.testing.assert_close(b.double(), u, atol=1e-6, rtol=0)  # B = U_r
        torch.testing.assert_close(a.double(), s[:, None] * vh, atol=1e-6, rtol=0)  # A = Σ_r V_rᵀ
        # another compile (another init) recomputes the same constants, bit for bit
        assert torch.equal(a, get_tensor(llama.graph_module, rec["tensors"]["A"]))
        assert torch.equal(b, get_tensor(llama.graph_module, rec["tensors"]["B"]))
        # the default core: N(0, 1e-5²), the official init_module_weights(sigma=0.00001)
        _, _, core = lora_xs_factors(get_tensor(zero.graph_module, rec["weight"]), layers[path],
                                     gp.LoRAXS(**LLAMA), seed=0)
        assert 0 < core.abs().max() < 1e-4 and 2e-6 < core.std() < 5e-5
    rule = gp.LoRAXS(targets=["q_proj"])  # published defaults
    assert (rule.r, rule.alpha, rule.init, rule.dropout) == (16, 16.0, "default", 0.0)
    with torch.no_grad():  # init="zero" is exactly the identity
        assert torch.equal(run(zero, "llama"), run(base, "llama"))


def test_rejections(llama):
    layers = find_layers(llama.graph_module)
    with pytest.raises(PlanError, match="rank r=33 is larger"):
        gp.Plan([gp.LoRAXS(targets=["q_proj"], r=33)]).resolve(layers)
    with pytest.raises(PlanError, match="does not support embedding"):
        gp.Plan([gp.LoRAXS(targets=["embed_tokens"])]).resolve(layers)
    for bad, match in [(dict(r=0), "r must be a positive integer"), (dict(init="pissa"), "init must be one of"),
                       (dict(dropout=1.0), "dropout"), (dict(alpha=0), "alpha"), (dict(sb_lr=-1.0), "sb_lr")]:
        with pytest.raises(PlanError, match=match):
            gp.LoRAXS(targets=["q_proj"], **bad)

    assert gp.Plan.from_dict([{"lora_xs": {**LLAMA, "init": "random"}}]) == llama.plan


def test_tied_weights_are_declined(gpt2_sb):
    with pytest.raises(PlanError, match="tied weights"):
        gp.Plan([gp.LoRAXS(targets=["lm_head"], r=2)]).resolve(find_layers(gpt2_sb.graph_module))


@pytest.mark.parametrize("arch,make", [("llama", tiny_llama), ("gpt2_sb", tiny_gpt2)])
def test_matches_the_formula(arch, make, request, parity):
    cm = request.getfixturevalue(arch)
    name = arch.split("_")[0]
    if arch == "llama":
        ref = _xs_reference(make, cm)  # factors from an independent SVD of each weight
    else:  # LoRA-SB factors come from the probe: the formula with cm's own A, B, R
        ref = make()
        for path, rec in cm.adapters().items():
            t = {k: get_tensor(cm.graph_module, v).detach() for k, v in rec["tensors"].items()}
            ref.set_submodule(path, ReferenceLoRAXS(ref.get_submodule(path), t["A"], t["B"], t["R"], rec["scaling"]))
        ref.eval()
    with torch.no_grad():
        assert (run(cm, name) - run(make(), name)).abs().max().item() > 1e-3  # the adapter does something
        diff = (run(cm, name) - run(ref, name)).abs().max().item()
    assert parity.record(f"lora_xs {arch} vs formula", diff) < 1e-5


def test_lora_sb_init_is_the_best_rank_r_first_update(gpt2_sb, parity):
    """s·B R A equals the rank-r truncation of -η·sign(∇W L), with ∇W L from eager PyTorch; B and
    A are orthonormal; the base weight is untouched."""
    updates = _sb_update(tiny_gpt2, GPT2["targets"], GPT2["sb_lr"])
    worst = 0.0
    for path, rec in gpt2_sb.adapters().items():
        t = {k: get_tensor(gpt2_sb.graph_module, v).detach().double() for k, v in rec["tensors"].items()}
        u, s, vh = torch.linalg.svd(updates[path], full_matrices=False)
        best = (u[:, :4] * s[:4]) @ vh[:4]
        ours = rec["scaling"] * t["B"] @ t["R"] @ t["A"]
        worst = max(worst, float((ours - best).abs().max() / best.abs().max()))
        torch.testing.assert_close(t["B"].T @ t["B"], torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
        torch.testing.assert_close(t["A"] @ t["A"].T, torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
    assert parity.record("lora_sb gpt2 init vs eager rank-r update (rel)", worst) < 1e-4
    base = tiny_gpt2()
    for rec in gpt2_sb.adapters().values():
        assert torch.equal(get_tensor(gpt2_sb.graph_module, rec["weight"]), base.get_submodule(rec["layer"]).weight)


def test_lora_sb_adapter_file_restores_the_probe_factors(gpt2_sb, tmp_path):
    # another probe batch gives other factors; the adapter file (constants included) restores them
    other_batch = (torch.randint(0, 128, IDS.shape, generator=torch.Generator().manual_seed(5)),)
    other = gp.compile(tiny_gpt2(), [gp.LoRAXS(**GPT2)], (IDS,), {"use_cache": False},
                       options={"probe_batch": other_batch})
    path = "transformer.h.0.attn.c_attn.lora_B.weight"
    assert not torch.equal(get_tensor(other.graph_module, path), get_tensor(gpt2_sb.graph_module, path))
    gpt2_sb.save_adapter(tmp_path / "sb")
    gp.load_adapter(other, tmp_path / "sb")
    with torch.no_grad():
        assert torch.equal(run(other, "gpt2"), run(gpt2_sb, "gpt2"))


@pytest.mark.parametrize("arch", ["llama", "gpt2_sb"])
def test_merge_is_exact(arch, request, parity):
    cm = request.getfixturevalue(arch)
    name = arch.split("_")[0]
    merged = check_merge(cm, name)
    worst = merged_weight_error(cm, merged, lambda t, rec: rec["scaling"] * t["B"] @ t["R"] @ t["A"])
    assert parity.record(f"lora_xs {arch} merged weight vs W + s·BRA", worst) < 1e-6


def test_onnx_merged_and_unmerged(llama, tmp_path, parity):
    check_onnx_merged_and_unmerged(llama, tmp_path, parity, "lora_xs llama")


def test_training_step_in_torch_and_onnxruntime(llama, tmp_path, parity):
    params = dict(llama.graph_module.named_parameters())
    lm_loss(llama, "llama").backward()  # eager autograd: only the cores get gradients
    assert {n for n, p in params.items() if p.grad is not None} == set(llama.trainable_parameters())
    for p in params.values():
        p.grad = None
    # the step trains the r x r cores only (trainable_parameters); AdamW, 3 steps compared
    result = check_training_export(llama, gp.optim.AdamW(lr=0.3), tmp_path, steps=8, compared=3)
    assert_loss_falls(result.torch_losses, by=0.05)  # 16 parameters a layer on a random model: slow but steady
    loss_diff, param_diff = result.record(parity, "lora_xs llama")
    assert loss_diff < 1e-4 and param_diff < 1e-4
