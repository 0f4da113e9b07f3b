"""silu_kernels (passes/lower): the torch executor's copy of a step graph runs silu's traced math
form as ATen's silu / silu_backward kernels. Structure, match count, declines with reasons, the
verifier on the lowered graph, numerics against the stored graph, and exports untouched."""

from __future__ import annotations

import torch
import torch.fx as fx

import graphpeft as gp
from graphpeft.graph import META_KEY
from graphpeft.infra import PassContext, copy_graph
from graphpeft.registry import PASSES
from graphpeft.training.runner import lower_for_torch
from graphpeft.training.signature import phase_of, verify_training

from models import tiny_llama, token_batch

IDS = token_batch()
LAYERS = 2
aten = torch.ops.aten


def _step(opt: gp.optim.Optimizer = None, **options: object) -> gp.TrainingStep:
    cm = gp.compile(tiny_llama(layers=LAYERS), gp.Plan([gp.LoRA(targets=["q_proj", "v_proj", "down_proj"], r=4,
                                                                 init="random")]), (IDS,), {"use_cache": False})
    return cm.compile_training("causal_lm", opt or gp.optim.AdamW(lr=1e-2), example_batch=(IDS,), **options)


def _lower(gm: fx.GraphModule) -> tuple:
    p = PASSES["silu_kernels"]()
    return p(copy_graph(gm), PassContext()).gm, p


def _targets(gm: fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_structure_match_count_and_verifier() -> None:
    step = _step()
    gm, p = _lower(step.graph_module)
    assert p.match_count("silu_forward") == LAYERS and p.match_count("silu_backward") == LAYERS
    targets = _targets(gm)
    assert targets.count(aten.silu.default) == LAYERS and targets.count(aten.silu_backward.default) == LAYERS
    assert aten.sigmoid.default not in targets and aten.rsub.Scalar not in targets  # the math form is gone
    before = _targets(step.graph_module)
    assert before.count(aten.sigmoid.default) == 2 * LAYERS and aten.silu.default not in before  # stored: untouched
    for n in gm.graph.nodes:
        if n.target in (aten.silu.default, aten.silu_backward.default):
            assert n.meta[META_KEY]["pass_name"] == "silu_kernels"
            assert phase_of(n) == ("forward" if n.target == aten.silu.default else "backward")
    verify_training(gm)


def test_lowered_step_matches_the_stored_graph() -> None:
    """The default runner (silu kernels; SGD, so no fused AdamW kernel) against the stored graph
    run as is, over three steps: equal up to the kernels' rounding."""
    ours, ref = _step(gp.optim.SGD(lr=0.5)), _step(gp.optim.SGD(lr=0.5), executor="fx")
    for _ in range(3):
        torch.testing.assert_close(ours(IDS), ref(IDS), rtol=1e-5, atol=1e-6)
    for (k, a), b in zip(ours.cm.trainable_parameters().items(), ref.cm.trainable_parameters().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def test_runner_graph_has_the_kernels() -> None:
    targets = [n.target for n in lower_for_torch(_step().graph_module).nodes if n.op == "call_function"]
    assert targets.count(aten.silu_backward.default) == LAYERS


def _silu_backward_graph(dy_shape: tuple, x_shape: tuple) -> fx.GraphModule:
    """``dy * s * (1 + x * (1 - s))`` with ``s = sigmoid(x)``, as the decomposition traces it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    g = fx.Graph()
    dy, x = g.placeholder("dy"), g.placeholder("x")
    s = g.call_function(aten.sigmoid.default, (x,))
    dy_s = g.call_function(aten.mul.Tensor, (dy, s))
    one_minus = g.call_function(aten.rsub.Scalar, (s, 1.0))
    x_term = g.call_function(aten.mul.Tensor, (x, one_minus))
    plus_one = g.call_function(aten.add.Scalar, (x_term, 1.0))
    g.output(g.call_function(aten.mul.Tensor, (dy_s, plus_one)))
    gm = fx.GraphModule(torch.nn.Module(), g)
    with FakeTensorMode() as mode:
        vals = {"dy": torch.empty(dy_shape), "x": torch.empty(x_shape)}
        for n in g.nodes:
            if n.op == "placeholder":
                n.meta["val"] = mode.from_tensor(torch.randn(vals[n.name].shape))
            elif n.op == "call_function":
                n.meta["val"] = n.target(*fx.map_arg(n.args, lambda a: a.meta["val"]))
    return gm


def test_backward_pattern_numerics_and_broadcast_declined() -> None:
    gm, p = _lower(_silu_backward_graph((3, 4), (3, 4)))
    assert p.match_count("silu_backward") == 1 and _targets(gm) == [aten.silu_backward.default]
    dy, x = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(gm(dy, x), _silu_backward_graph((3, 4), (3, 4))(dy, x))
    gm, p = _lower(_silu_backward_graph((1, 4), (3, 4)))  # dy broadcast: not silu_backward's signature
    assert p.match_count() == 0 and aten.silu_backward.default not in _targets(gm)
    assert any("broadcast" in m.reason for m in p.results if not m.ok), [m.reason for m in p.results]
