"""Pass infrastructure (issue 2, part 4): the pass protocol, pipelines (nested, fixed point),
the pass manager running the verifier after every pass, typed errors naming the pass and the
passes before it, hooks (timing, numbered IR dumps), user passes and user rewrite rules with
reasons, functional vs in-place passes.

Most tests use a two-layer MLP (tracing it takes a fraction of a second); the hook tests run
through ``gp.compile`` on it as a user would.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import pytest
import torch
import torch.fx as fx

import graphpeft as gp
from graphpeft.graph import GraphBuilder, Provenance, Role, find_layers, op_count, register_tensor, roles
from graphpeft.infra import clone_graph_module
from graphpeft.registry import PASSES

from conftest import call_ops, created_nodes

aten = torch.ops.aten


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


X = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return MLP().eval()


@pytest.fixture
def gm(mlp):
    """A freshly traced graph per test (passes here mutate it)."""
    return gp.trace(mlp, (X,)).gm


# --- passes used by the tests ------------------------------------------------------------------


class Noop(gp.PassBase):
    name = "noop"

    def call(self, gm, ctx):
        return gp.PassResult(gm, False)


class AddUnusedAdapter(gp.PassBase):
    """Broken on purpose: registers a trainable tensor that no node reads."""

    name = "add_unused_adapter"

    def call(self, gm, ctx):
        register_tensor(gm, "fc1.junk.weight", torch.zeros(3), Role.ADAPTER)
        return gp.PassResult(gm, True)


class AdapterWithoutProvenance(gp.PassBase):
    """Broken on purpose: adds an adapter branch with plain graph calls (no provenance)."""

    name = "adapter_without_provenance"

    def call(self, gm, ctx):
        layer = find_layers(gm)[0]
        register_tensor(gm, "fc1.extra.weight", torch.zeros(layer.out_features, layer.in_features), Role.ADAPTER)
        g = gm.graph
        with g.inserting_after(layer.node):
            w = g.get_attr("fc1.extra.weight")
        with g.inserting_after(w):
            y = g.call_function(aten.linear.default, (layer.node.args[0], w))
        with g.inserting_after(y):
            z = g.call_function(aten.add.Tensor, (layer.node, y))
        layer.node.replace_all_uses_with(z, delete_user_cb=lambda u: u is not z)
        return gp.PassResult(gm, True)


class Crashes(gp.PassBase):
    name = "crashes"

    def call(self, gm, ctx):
        raise RuntimeError("boom")


class RaisesPlanError(gp.PassBase):
    name = "raises_plan_error"

    def call(self, gm, ctx):
        raise gp.PlanError("the layer is not there")


# --- the verifier after every pass, typed errors -----------------------------------------------


def test_pass_manager_runs_the_verifier_after_every_pass(gm):
    seen = []
    pm = gp.PassManager(verifier=lambda g: seen.append(op_count(g)))
    result = pm.run(gm, gp.Pipeline("p", [Noop(), Noop(), Noop()]))
    assert seen == [op_count(gm)] * 3
    assert result.gm is gm and result.modified is False


@pytest.mark.parametrize("broken, message", [
    (AddUnusedAdapter, "trainable tensor fc1.junk.weight (adapter) is not used by the graph"),
    (AdapterWithoutProvenance, "uses adapter tensor fc1.extra.weight but has no provenance"),
])
def test_broken_pass_is_caught_by_the_verifier(gm, broken, message):
    with pytest.raises(gp.PassError) as info:
        gp.PassManager().run(gm, gp.Pipeline("p", [Noop(), broken(), Noop()]))
    e = info.value
    assert e.pass_name == broken.name and e.ran_before == ["noop"]
    assert f"pass '{broken.name}' failed: the graph it produced is invalid" in str(e)
    assert message in str(e) and "(passes run before it: noop)" in str(e)
    assert isinstance(e.__cause__, gp.VerificationError)


def test_verifier_can_be_switched_off(gm):
    result = gp.PassManager().run(gm, [AddUnusedAdapter()], gp.PassContext(verify=False))
    assert "fc1.junk.weight" in roles(result.gm)
    with pytest.raises(gp.VerificationError, match="is not used by the graph"):
        gp.verify(result.gm)


def test_exception_in_a_pass_becomes_pass_error_naming_it(gm):
    ctx = gp.PassContext()
    with pytest.raises(gp.PassError, match=r"pass 'crashes' failed: RuntimeError: boom "
                                           r"\(passes run before it: noop, noop\)") as info:
        gp.PassManager().run(gm, gp.Pipeline("outer", [Noop(), gp.Pipeline("inner", [Noop(), Crashes()])]), ctx)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert ctx.history == ["noop", "noop"]


def test_graphpeft_errors_keep_their_type_and_name_the_pass(gm):
    with pytest.raises(gp.PlanError, match=r"the layer is not there \[in pass 'raises_plan_error'; "
                                           r"before it: noop\]"):
        gp.PassManager().run(gm, [Noop(), RaisesPlanError()])


def test_requires_and_ensures_are_checked(gm):
    class Picky(Noop):
        name = "picky"

        def requires(self, gm, ctx):
            if not any(n.target == aten.gelu.default for n in gm.graph.nodes):
                raise gp.VerificationError("needs a gelu")

    with pytest.raises(gp.VerificationError, match=r"needs a gelu \[in pass 'picky'"):
        gp.PassManager().run(gm, [Picky()])


def test_verifier_accepts_a_compiled_graph_and_checks_roles(mlp):
    cm = gp.compile(mlp, gp.Plan([gp.LoRA(targets=["fc1"], r=2)]), example_inputs=(X,))
    gp.verify(cm.graph_module)
    g = clone_graph_module(cm.graph_module)
    g.get_parameter("fc2.weight").requires_grad_(True)  # a frozen weight that would get a gradient
    with pytest.raises(gp.VerificationError, match="fc2.weight has role frozen but requires_grad=True"):
        gp.verify(g)
    g = clone_graph_module(cm.graph_module)
    del roles(g)["fc2.bias"]
    with pytest.raises(gp.VerificationError, match="tensor fc2.bias has no role"):
        gp.verify(g)


def test_verifier_rechecks_only_nodes_whose_inputs_or_values_changed(mlp, monkeypatch):
    import importlib
    import weakref

    from torch.utils import _pytree as pytree

    verify_mod = importlib.import_module("graphpeft.verify")
    from graphpeft.graph import META_KEY

    cm = gp.compile(mlp, gp.Plan([gp.LoRA(targets=["fc1"], r=2)]), example_inputs=(X,))
    g = cm.graph_module
    stamped = [n for n in g.graph.nodes if n.op == "call_function" and META_KEY in n.meta
               and isinstance(n.meta.get("val"), torch.Tensor)]
    evaluated = []
    real = verify_mod.fake_eval
    monkeypatch.setattr(verify_mod, "fake_eval", lambda mode, t, a, k: evaluated.append(t) or real(mode, t, a, k))
    gp.verify(g)
    gp.verify(g)
    assert stamped and len(evaluated) <= len(stamped)  # the second run re-evaluates nothing
    node = stamped[-1]
    node.meta["val"] = torch.empty(3, 3, device="meta")  # a pass recording a wrong value: checked again
    with pytest.raises(gp.VerificationError, match=f"node {node.name} records"):
        gp.verify(g)
    # the memo holds nodes weakly and no node in what it remembers (a node leads to its graph and weights)
    assert isinstance(verify_mod._checked, weakref.WeakKeyDictionary)
    leaves = [x for v in verify_mod._checked.values() for x in pytree.tree_leaves(v)]
    assert leaves and not any(isinstance(x, fx.Node) for x in leaves)


# --- hooks -----------------------------------------------------------------------------------


def test_timing_and_ir_dump_hooks_through_compile(mlp, tmp_path):
    timing, dump = gp.TimingHook(), gp.IRDumpHook(tmp_path / "ir")
    cm = gp.compile(mlp, gp.Plan([gp.LoRA(targets=["fc1", "fc2"], r=2)]), example_inputs=(X,),
                    hooks=[timing, dump])
    names = [n for n, _ in timing.timings]
    assert names == ["insert_lora", "freeze", "remove_dead_code"]
    assert all(s >= 0 for _, s in timing.timings)
    assert "insert_lora" in timing.table() and "ms" in timing.table()
    files = sorted(os.listdir(tmp_path / "ir"))
    assert files == ["000_input.txt", "001_insert_lora.txt", "002_freeze.txt", "003_remove_dead_code.txt"]
    before = (tmp_path / "ir" / "000_input.txt").read_text()
    after = (tmp_path / "ir" / "001_insert_lora.txt").read_text()
    assert "lora_A" not in before and "fc1.lora_A.weight" in after
    assert after.count("aten.linear.default") == before.count("aten.linear.default") + 4
    assert len(cm.adapters()) == 2


class CountingHook(gp.PassHook):
    def __init__(self) -> None:
        self.events: list[str] = []

    def before_pass(self, p, gm, ctx):
        self.events.append(f"before {p.name}")

    def after_pass(self, p, result, ctx, seconds):
        self.events.append(f"after {p.name} modified={result.modified}")


def test_custom_hook_sees_every_pass(gm):
    hook = CountingHook()
    gp.PassManager().run(gm, [Noop(), PASSES["remove_dead_code"]()], gp.PassContext(hooks=[hook]))
    assert hook.events == ["before noop", "after noop modified=False",
                           "before remove_dead_code", "after remove_dead_code modified=False"]


# --- pipelines ---------------------------------------------------------------------------------


class CountDown(gp.PassBase):
    """Reports a change the first ``n`` times it runs (a stand-in for a simplifying pass)."""

    name = "count_down"

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def call(self, gm, ctx):
        self.calls += 1
        return gp.PassResult(gm, self.calls <= self.n)


def test_pipeline_fixed_point(gm):
    p = CountDown(3)
    result = gp.PassManager().run(gm, gp.Pipeline("simplify", [p, Noop()], fixed_point=True))
    assert p.calls == 4 and result.modified  # 3 changing rounds + 1 that changes nothing
    once = CountDown(3)
    gp.PassManager().run(gm, gp.Pipeline("once", [once]))
    assert once.calls == 1


def test_pipeline_fixed_point_step_cap(gm, caplog):
    p = CountDown(100)
    with caplog.at_level(logging.WARNING, logger="graphpeft.infra"):
        gp.PassManager().run(gm, gp.Pipeline("never", [p], fixed_point=True, max_iterations=5))
    assert p.calls == 5
    assert "pipeline never did not reach a fixed point in 5 iterations" in caplog.text


def test_pipelines_compose_and_name_their_passes():
    inner = gp.Pipeline("cleanup", [PASSES["remove_dead_code"](), Noop()])
    outer = gp.Pipeline("all", [Noop(), inner, PASSES["freeze"]()])
    assert outer.flat_names() == ["noop", "remove_dead_code", "noop", "freeze"]
    plan = gp.Plan([gp.LoRA(targets=["fc1"])])
    assert gp.build_pipeline(plan).flat_names() == ["insert_lora", "freeze", "remove_dead_code"]


# --- functional vs in-place --------------------------------------------------------------------


def add_relu_after_output(gm: fx.GraphModule, name: str) -> None:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    (y,) = out.args[0]
    g = GraphBuilder(gm, y, Provenance(name, origin="output"))
    r = g.call(aten.relu.default, y)
    out.args = ((r,),)


class ReluInPlace(gp.PassBase):
    name = "relu_in_place"
    in_place = True

    def call(self, gm, ctx):
        add_relu_after_output(gm, self.name)
        return gp.PassResult(gm, True)


class ReluFunctional(gp.PassBase):
    name = "relu_functional"
    in_place = False

    def call(self, gm, ctx):
        new = clone_graph_module(gm)
        add_relu_after_output(new, self.name)
        return gp.PassResult(new, True)


@pytest.mark.parametrize("cls", [ReluInPlace, ReluFunctional])
def test_in_place_and_functional_passes(gm, cls):
    before_code, before_ops = gm.code, op_count(gm)
    want = torch.relu(gm(X)[0])
    result = gp.PassManager().run(gm, [cls()])
    assert op_count(result.gm) == before_ops + 1
    assert torch.equal(result.gm(X)[0], want)
    assert [n.meta["graphpeft"]["pass_name"] for n in created_nodes(result.gm)] == [cls.name]
    if cls.in_place:
        assert result.gm is gm  # mutated and returned
    else:
        assert result.gm is not gm  # a new module; the input is untouched
        assert gm.code == before_code and op_count(gm) == before_ops
        assert not created_nodes(gm)


# --- user passes and user rewrite rules ------------------------------------------------------------


@gp.register_pass
class ScaleLogits(gp.PassBase):
    """A user's pass, registered the way built-ins are: multiplies the output by a constant."""

    name = "test_scale_logits"

    def __init__(self, factor: float = 2.0) -> None:
        self.factor = factor

    def call(self, gm, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        (y,) = out.args[0]
        g = GraphBuilder(gm, y, Provenance(self.name, rule="scale", origin="fc2"))
        out.args = ((g.call(aten.mul.Tensor, y, self.factor),),)
        return gp.PassResult(gm, True)


def test_user_pass_registered_by_decorator(gm):
    assert PASSES["test_scale_logits"] is ScaleLogits
    want = gm(X)[0] * 3.0
    result = gp.PassManager().run(gm, [PASSES["test_scale_logits"](3.0)])
    assert torch.allclose(result.gm(X)[0], want)
    (node,) = created_nodes(result.gm)
    assert node.meta["graphpeft"] == {"pass_name": "test_scale_logits", "rule": "scale", "origin": "fc2",
                                      "adapter": "", "part": ""}
    assert node.meta["val"].shape == (2, 4)


class ClampLinearOutputs(gp.RewriteRule):
    """A user's rewrite rule: clamp the output of chosen linear layers, with reasons."""

    name = "clamp_linear"

    def __init__(self, targets: set[str], too_wide: int = 1000) -> None:
        self.targets, self.too_wide = targets, too_wide

    def match(self, gm, node, ctx) -> Optional[gp.MatchResult]:
        if node.op != "call_function" or node.target != aten.linear.default or "graphpeft" in node.meta:
            return None  # not a layer: not worth a reason
        path = list(node.meta["nn_module_stack"].values())[-1][0]
        if path not in self.targets:
            return gp.MatchResult.fail(self.name, node, f"{path} is not a target", path)
        return gp.MatchResult.success(self.name, node, path, width=node.meta["val"].shape[-1])

    def check(self, gm, match, ctx) -> Optional[str]:
        if match.bindings["width"] > self.too_wide:
            return f"output width {match.bindings['width']} > {self.too_wide}"
        return None

    def rewrite(self, gm, match, ctx) -> None:
        y = match.node
        g = GraphBuilder(gm, y, Provenance("clamp_pass", self.name, match.origin))
        c = g.call(aten.clamp.default, y, -0.1, 0.1)
        y.replace_all_uses_with(c, delete_user_cb=lambda u: u is not c)


def test_user_rewrite_rule_structure_count_numbers_and_reasons(gm, mlp):
    rp = gp.RewritePass([ClampLinearOutputs({"fc1", "fc2"}, too_wide=8)])
    rp.name = "clamp_pass"
    ops_before = op_count(gm)
    result = gp.PassManager().run(gm, [rp])
    # match count: fc1 (16 wide) declined at check, fc2 rewritten
    assert rp.match_count() == 1 and result.modified
    outcomes = [(m.origin, m.ok, m.stage, m.reason) for m in rp.results]
    assert outcomes == [("fc1", False, "check", "output width 16 > 8"), ("fc2", True, "rewrite", "")]
    # structure: one clamp after fc2, stamped with provenance
    assert op_count(result.gm) == ops_before + 1
    (node,) = created_nodes(result.gm)
    assert node.target == aten.clamp.default and node.meta["graphpeft"]["origin"] == "fc2"
    assert call_ops(result.gm)[-1] == aten.clamp.default
    # numbers
    with torch.no_grad():
        want = mlp(X).clamp(-0.1, 0.1)
    assert torch.allclose(result.gm(X)[0], want)


def test_user_rewrite_rule_negative_no_match(gm):
    rp = gp.RewritePass([ClampLinearOutputs({"nothing"})])
    code = gm.code
    result = gp.PassManager().run(gm, [rp])
    assert rp.match_count() == 0 and not result.modified and result.gm.code == code
    assert [m.reason for m in rp.results] == ["fc1 is not a target", "fc2 is not a target"]
    assert all(not m for m in rp.results)


def test_rewrite_results_land_in_the_context_report(gm):
    ctx = gp.PassContext()
    gp.PassManager().run(gm, [gp.RewritePass([ClampLinearOutputs({"fc2"})])], ctx)
    assert [(m.rule, m.origin, m.ok) for m in ctx.report] == [("clamp_linear", "fc1", False),
                                                               ("clamp_linear", "fc2", True)]
