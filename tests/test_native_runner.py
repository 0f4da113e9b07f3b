"""The torch executor's runner (graphpeft.training.runner): the step graph run through PyTorch's
Python bindings instead of ``torch.ops`` calls, bit-identical to the fx graph module; trainable
tensors resolved to their owner modules once; alias and copy-then-view dropped."""

from __future__ import annotations

import torch
import torch.fx as fx

import graphpeft as gp
from graphpeft.training.runner import (NATIVE_FUNCTIONS, NATIVE_METHODS, NativeRunner, TensorRefs, lower_for_torch,
                                       native_graph)

from models import tiny_llama, token_batch

IDS = token_batch()


def _model() -> gp.CompiledModel:
    return gp.compile(tiny_llama(), gp.Plan([gp.LoRA(targets=["q_proj", "v_proj", "down_proj"], r=4, init="random")]),
                      (IDS,), {"use_cache": False})


def test_native_graph_structure() -> None:
    """Every op of the tables becomes a torch function / tensor method; the rest is copied."""
    step = _model().compile_training("causal_lm", gp.optim.AdamW(lr=1e-3), example_batch=(IDS,))
    graph = step.graph_module.graph
    mapped = sum(1 for n in graph.nodes if n.op == "call_function" and (n.target in NATIVE_FUNCTIONS or n.target in NATIVE_METHODS))
    native = native_graph(graph)
    aten = torch.ops.aten
    dropped = {n.name for n in graph.nodes if n.target == aten.alias.default
               or (n.target == aten.clone.default and [u.target for u in n.users] == [aten.view.default])}
    assert dropped and [n.name for n in native.nodes] == [n.name for n in graph.nodes if n.name not in dropped]
    assert sum(1 for n in native.nodes if n.target == "reshape") == sum(
        1 for n in graph.nodes if n.target == aten.clone.default and n.name in dropped)
    assert mapped > 100
    assert not any(n.target in NATIVE_FUNCTIONS or n.target in NATIVE_METHODS
                   for n in native.nodes if n.op == "call_function")
    assert sum(1 for n in native.nodes if n.op == "call_method") == sum(
        1 for n in graph.nodes if n.op == "call_function" and n.target in NATIVE_METHODS)  # views -> reshape
    assert NativeRunner(step.graph_module).num_native == mapped


def _two_steps(executor: object, other: object = "fx", opt: object = None) -> tuple:
    a, b = _model(), _model()
    b.load_adapter_state_dict(a.adapter_state_dict())
    opt = opt or gp.optim.AdamW(lr=1e-2, weight_decay=0.1)
    return a, b, a.compile_training("causal_lm", opt, executor=executor), b.compile_training("causal_lm", opt,
                                                                                            executor=other)


def test_native_runner_is_bit_identical_to_the_fx_graph() -> None:
    """The runner's bindings without its lowering vs executor="fx": same loss, tensors and AdamW
    state, step after step."""
    a, b, sa, sb = _two_steps(NativeRunner)
    for _ in range(3):
        assert torch.equal(sa(IDS), sb(IDS))
    pa, pb = a.trainable_parameters(), b.trainable_parameters()
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert all(torch.equal(sa.state_dict()["optimizer"][k], sb.state_dict()["optimizer"][k])
               for k in sa.state_dict()["optimizer"])


def test_default_runner_fused_adamw_matches_the_fx_graph() -> None:
    """The default executor runs each fused AdamW chunk as torch's fused kernel (and silu as
    ATen's kernels: tests/test_silu_kernels.py): the same losses, tensors and state as the traced
    arithmetic (executor="fx") to float rounding, which AdamW's normalized step can amplify in an
    element whose moments are tiny; with SGD no fused AdamW kernel."""
    a, b, sa, sb = _two_steps(None)
    assert sum(1 for n in lower_for_torch(sa.graph_module).nodes
               if n.target == torch.ops.graphpeft.adamw_update.default) == 1
    for _ in range(3):
        torch.testing.assert_close(sa(IDS), sb(IDS), rtol=1e-5, atol=1e-6)
    pa, pb = a.trainable_parameters(), b.trainable_parameters()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-4, atol=1e-5)
    oa, ob = sa.state_dict()["optimizer"], sb.state_dict()["optimizer"]
    for k in oa:
        torch.testing.assert_close(oa[k], ob[k], rtol=1e-4, atol=1e-6)  # via the parameters
    _, _, sa, sb = _two_steps(None, opt=gp.optim.SGD(lr=1e-2, momentum=0.9))
    assert not any(n.target == torch.ops.graphpeft.adamw_update.default for n in lower_for_torch(sa.graph_module).nodes)
    assert lower_for_torch(sa.graph_module, ("fused_optimizer_kernel",)) is sa.graph_module.graph
    for _ in range(2):
        torch.testing.assert_close(sa(IDS), sb(IDS), rtol=1e-6, atol=1e-7)  # silu kernels: rounding only


def test_native_runner_reads_frozen_weights_from_the_graph_module() -> None:
    """get_attr reads go to the graph module at each call: a replaced weight is the one used."""
    lin = torch.nn.Linear(3, 2)
    gm = fx.symbolic_trace(lin)
    x = torch.randn(4, 3)
    run = NativeRunner(gm)
    assert torch.equal(run(x), lin(x))
    gm.weight = torch.nn.Parameter(torch.zeros(2, 3))
    assert torch.equal(run(x), gm.bias.expand(4, 2))


def test_tensor_refs_follow_a_replaced_parameter() -> None:
    m = torch.nn.Sequential(torch.nn.Linear(2, 2))
    refs = TensorRefs(m, ["0.weight", "0.bias"])
    assert refs.get()[0] is m[0].weight and refs.valid_for(m) and not refs.valid_for(torch.nn.Linear(1, 1))
    m[0].weight = torch.nn.Parameter(torch.ones(2, 2))
    assert refs.get()[0] is m[0].weight
