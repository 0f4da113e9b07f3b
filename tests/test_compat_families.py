"""transformers families end to end (issue 14): a fast subset of ``benchmarks/families.py``, and
the fixes it led to: a linear layer's in-place bias add over 3-D+ inputs in exported training
steps (ConvNeXt, SigLIP), and MoE experts' grouped matmul (Mixtral, Qwen2-MoE) written out in
ATen ops so it differentiates and exports."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.fx.experimental.proxy_tensor import make_fx

import graphpeft as gp
from benchmarks import families as fam

aten = torch.ops.aten


def test_the_families_table_covers_every_kind():
    names = [f.name for f in fam.FAMILIES]
    assert len(names) == len(set(names)) >= 45
    assert {f.kind for f in fam.FAMILIES} == {"decoder", "moe", "encoder", "encdec", "vision", "speech"}
    for required in ("llama", "gpt2", "bert", "t5", "vit", "whisper", "mixtral", "swin", "convnext"):
        assert required in names


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_family_end_to_end(name, tmp_path):
    f = next(x for x in fam.FAMILIES if x.name == name)
    row = fam.run_family(f, str(tmp_path))
    failed = {s: v["note"] for s, v in row["stages"].items() if not v["ok"]}
    assert not failed and set(row["stages"]) == set(fam.STAGES)


class Channels(nn.Module):
    """ConvNeXt's pattern: a Linear with a bias over contiguous channels-last 4-D activations."""

    def __init__(self, pool: bool = False) -> None:
        super().__init__()
        self.pool = pool
        self.conv, self.norm = nn.Conv2d(3, 8, 3, padding=1), nn.LayerNorm(8)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        h = self.norm(self.conv(x).permute(0, 2, 3, 1))
        y = self.fc2(torch.nn.functional.gelu(self.fc1(h)))
        return y.mean((1, 2)) if self.pool else y


@pytest.mark.parametrize("pool", [False, True], ids=["inplace-bias", "view-of-expanded-grad"])
def test_inplace_bias_of_a_4d_linear_trains_in_onnxruntime(pool, tmp_path):
    """Also (pool): the spatial mean's gradient is an expand the step views without a copy."""
    from graphpeft.backends.onnx import OnnxTrainer

    torch.manual_seed(0)
    x, target = torch.randn(2, 3, 5, 5), torch.randn(2, 8) if pool else torch.randn(2, 5, 5, 8)
    cm = gp.compile(Channels(pool).eval(), gp.Plan([gp.LoRA(targets=["conv", "fc2"], r=2, init="random")]), (x,))  # fc1 keeps its own linear
    step = cm.compile_training("mse", gp.optim.SGD(lr=0.1), example_batch=(x, target))
    assert any(n.target is aten.add_.Tensor for n in step.graph_module.graph.nodes)  # what the export meets
    step.export_onnx(tmp_path / "t.onnx")
    trainer = OnnxTrainer(tmp_path / "t.onnx")
    for _ in range(2):
        assert abs(float(trainer.step(x, target)) - float(step(x, target))) < 1e-6
    ours, theirs = cm.adapter_state_dict(), trainer.adapter_state_dict()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 1e-6


def _legalize(gm):
    from graphpeft.infra import PassContext
    from graphpeft.passes.legalize.legalize_onnx import LegalizeOnnx

    LegalizeOnnx()(gm, PassContext())
    return gm


def test_a_write_into_a_view_is_functionalized_only_when_nobody_else_reads_it():
    def unobserved(x, w):
        v = (x @ w).view(-1)
        v.add_(1.0)
        return v * 2

    def observed(x, w):
        y = x @ w
        y.view(-1).add_(1.0)
        return y * 2  # reads the base after the write

    x, w = torch.randn(3, 4), torch.randn(4, 5)
    gm = _legalize(make_fx(unobserved, tracing_mode="fake")(x, w))
    assert not any(getattr(n.target, "_schema", None) is not None and n.target._schema.is_mutable
                   for n in gm.graph.nodes if n.op == "call_function")
    assert torch.equal(gm(x, w), unobserved(x, w))
    with pytest.raises(gp.ExportError, match="ONNX has no in-place ops"):
        _legalize(make_fx(observed, tracing_mode="fake")(x, w))


class Experts(nn.Module):
    """A projection, a router and transformers' grouped-matmul experts, as Mixtral computes them
    (rows sorted by expert, outputs scaled by the routing weight)."""

    def __init__(self, experts: int = 3) -> None:
        super().__init__()
        self.proj, self.router = nn.Linear(6, 6), nn.Linear(6, experts)
        self.weight = nn.Parameter(torch.randn(experts, 6, 4))

    def forward(self, x):
        import transformers.integrations.moe  # noqa: F401 - registers the custom op

        h = self.proj(x)
        probs = self.router(h).softmax(-1)
        weight, expert = probs.max(-1)
        order = expert.argsort()  # any order within an expert: index_copy puts rows back
        offs = torch.cumsum((expert[:, None] == torch.arange(self.weight.shape[0])).sum(0), 0).to(torch.int32)
        y = torch.ops.transformers.grouped_mm_fallback(h[order], self.weight, offs)
        return torch.empty_like(y).index_copy(0, order, y) * weight.unsqueeze(-1)


def test_grouped_mm_of_experts_is_written_out_and_exports(tmp_path):
    from graphpeft.backends.onnx import OnnxRunner, OnnxTrainer

    torch.manual_seed(0)
    model, x, target = Experts().eval(), torch.randn(10, 6), torch.randn(10, 4)
    cm = gp.compile(model, gp.Plan([gp.Update(targets=["proj"])]), (x,))
    ops = {n.target for n in cm.graph_module.graph.nodes if n.op == "call_function"}
    assert torch.ops.transformers.grouped_mm_fallback.default not in ops
    assert sum(n.target is aten.mm.default for n in cm.graph_module.graph.nodes) == 3  # one per expert
    with torch.no_grad():
        want = model(x)
        assert (cm(x) - want).abs().max().item() < 1e-6
    cm.export_onnx(tmp_path / "m.onnx", merged=True)
    assert (torch.from_numpy(OnnxRunner(tmp_path / "m.onnx").run([x])[0]) - want).abs().max().item() < 1e-5
    # the step in torch and in onnxruntime against eager autograd through transformers' own backward
    step = cm.compile_training("mse", gp.optim.SGD(lr=0.1), example_batch=(x, target))
    step.export_onnx(tmp_path / "t.onnx")
    trainer = OnnxTrainer(tmp_path / "t.onnx")
    loss = torch.nn.functional.mse_loss(model(x), target)
    loss.backward()
    assert abs(float(step(x, target)) - loss.item()) < 1e-6
    assert abs(float(trainer.step(x, target)) - loss.item()) < 1e-6
    want_w = model.proj.weight.detach() - 0.1 * model.proj.weight.grad
    ours, theirs = cm.trainable_parameters(), trainer.adapter_state_dict()
    for got in (ours, theirs):
        w = next(v for k, v in got.items() if k.endswith("proj.weight"))
        assert (w - want_w).abs().max().item() < 1e-6
