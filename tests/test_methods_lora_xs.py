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

from method_helpers import (IDS, assert_loss_falls, check_merge, check_onnx, check_provenance, compile_model,
                            created_ops, lm_loss, randomize, run)
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


def _rows(module: torch.nn.Module) -> torch.Tensor:
    # GPT-2's Conv1D stores (in, out)
    return module.weight.T if type(module).__name__ == "Conv1D" else module.weight


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
        u, s, vh = _svd(_rows(base).detach(), rec["config"].get("r", 16))
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
    return {n: -lr * torch.sign(_rows_of(model.get_submodule(n), g)).double() for n, g in zip(names, grads)}


def _rows_of(module: torch.nn.Module, t: torch.Tensor) -> torch.Tensor:
    return t.T if type(module).__name__ == "Conv1D" else t


def train_torch_and_onnx(cm, lr: float, tmp_path, steps: int = 8, compared: int = 3):
    """A verified training step (AdamW) trained ``steps`` times by torch, and the same step
    exported and trained ``compared`` times from the same start by onnxruntime; cm is restored
    afterwards. Returns (torch losses, onnxruntime losses, max relative difference of the
    parameters after ``compared`` steps of each, step). Only the first steps are compared:
    AdamW's early steps are ``lr·sign(g)``-like, so a gradient entry near zero whose sign differs
    in the last float32 bit moves its parameter by up to ``2·lr`` and the runs drift apart."""
    from graphpeft.backends.onnx import OnnxTrainer

    saved = cm.adapter_state_dict()
    try:
        step = cm.compile_training("causal_lm", gp.optim.AdamW(lr=lr), example_batch=(IDS,))  # verify=True
        step.export_onnx(tmp_path / "train.onnx")
        torch_losses = []
        for i in range(steps):
            torch_losses.append(float(step(IDS)))
            if i + 1 == compared:
                trained = cm.adapter_state_dict()
        trainer = OnnxTrainer(tmp_path / "train.onnx")
        ort_losses = [float(trainer.step(IDS)) for _ in range(compared)]
        ort = trainer.adapter_state_dict()
        diff = max(float((ort[k] - trained[k]).abs().max() / trained[k].abs().max().clamp_min(1.0)) for k in trained)
        return torch_losses, ort_losses, diff, step
    finally:
        cm.load_adapter_state_dict(saved)


@pytest.fixture(scope="module")
def llama():
    cm = compile_model("llama", [gp.LoRAXS(**LLAMA, init="random")])
    randomize(cm)
    return cm


@pytest.fixture(scope="module")
def gpt2_sb():
    return compile_model("gpt2", [gp.LoRAXS(**GPT2)])  # LoRA-SB: fresh, as the probe made it


def test_structure_roles_and_match_count(llama):
    paths = [f"model.layers.{i}.{p}" for i in (0, 1) for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
    assert sorted(llama.adapters()) == sorted(paths)
    assert sum(line.startswith("  + ") for line in llama.explain().splitlines()) == 6
    check_provenance(llama, "insert_lora_xs", "lora_xs[q_proj,v_proj,down_proj]")
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
    from graphpeft.passes.insert_lora_xs import lora_xs_factors

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
    worst = 0.0
    for rec in cm.adapters().values():
        t = {k: get_tensor(cm.graph_module, v).detach().double() for k, v in rec["tensors"].items()}
        delta = rec["scaling"] * t["B"] @ t["R"] @ t["A"]
        w = get_tensor(cm.graph_module, rec["weight"]).detach().double()
        expected = w + (delta.T if rec["fan_in_fan_out"] else delta)
        worst = max(worst, float((get_tensor(merged.graph_module, rec["weight"]).double() - expected).abs().max()))
    assert parity.record(f"lora_xs {arch} merged weight vs W + s·BRA", worst) < 1e-6


def test_onnx_merged_and_unmerged(llama, tmp_path, parity):
    parity.record("lora_xs llama onnxruntime unmerged", check_onnx(llama, str(tmp_path / "xs.onnx"), merged=False))
    parity.record("lora_xs llama onnxruntime merged", check_onnx(llama, str(tmp_path / "xs_m.onnx"), merged=True))


def test_training_step_in_torch_and_onnxruntime(llama, tmp_path, parity):
    params = dict(llama.graph_module.named_parameters())
    lm_loss(llama, "llama").backward()  # eager autograd: only the cores get gradients
    assert {n for n, p in params.items() if p.grad is not None} == set(llama.trainable_parameters())
    for p in params.values():
        p.grad = None
    torch_losses, ort_losses, diff, step = train_torch_and_onnx(llama, lr=0.3, tmp_path=tmp_path)
    assert set(step.signature.params) == set(llama.trainable_parameters())  # the r x r cores only
    assert_loss_falls(torch_losses, by=0.05)  # 16 parameters a layer on a random model: slow but steady
    parity.record("lora_xs llama train loss first", torch_losses[0])
    parity.record("lora_xs llama train loss last", torch_losses[-1])
    loss_diff = max(abs(a - b) for a, b in zip(ort_losses, torch_losses))
    assert parity.record("lora_xs llama train onnxruntime vs torch (loss)", loss_diff) < 1e-4
    assert parity.record("lora_xs llama train onnxruntime vs torch (params, rel)", diff) < 1e-4
