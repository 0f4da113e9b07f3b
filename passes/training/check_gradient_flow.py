"""Check the gradient flow of a training graph (an analysis pass: it changes nothing).

It proves, on the graph itself, what the roles promise:

* no frozen tensor gets a gradient: frozen weights and buffers are stored in the graph
  (``get_attr``), never inputs or outputs of the step, and every tensor the step updates has a
  trainable role;
* the backward stops where nothing trainable lies below: every backward op feeds some trainable
  tensor's gradient. A backward op that feeds none computes a gradient nobody needs (a frozen
  weight's, or an activation's below the lowest adapter) and is reported. Run it after
  ``remove_dead_code``: autograd formulas that compute several gradients at once (batch norm's
  backward yields the frozen weight's and bias's gradients too) leave such ops, which dead-code
  removal prunes; any that survive are a real leak;
* every trainable tensor receives a gradient that depends on the loss (a trainable tensor the
  loss does not reach would silently train on zeros, and breaks joint-graph export).

The findings (counts of forward/backward ops, the ops of each kind that the trainable tensors
make necessary) are stored in ``gm.meta["graphpeft"]["gradient_flow"]``.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from graphpeft.errors import VerificationError
from graphpeft.graph import META_KEY, Role, graph_meta, roles
from graphpeft.infra import PassBase, PassContext, PassResult
from graphpeft.registry import register_pass
from graphpeft.training import phase_of, signature_of


def gradient_flow(gm: fx.GraphModule) -> dict[str, Any]:
    """Analyse ``gm``; returns the findings, with ``problems`` listing every violation."""
    sig = signature_of(gm)
    problems: list[str] = []
    role_map = roles(gm)
    for name, role in sig.param_roles.items():
        if not Role(role).trainable:
            problems.append(f"{name} is {role} but the step computes a gradient and an update for it")
        if name in role_map:
            problems.append(f"{name} is updated by the step but also stored in the graph as a constant")
    for name, role in role_map.items():
        if role.trainable:
            problems.append(f"trainable tensor {name} is stored in the graph: it would never be updated")

    nodes = list(gm.graph.nodes)
    out_node = nodes[-1]
    outputs = [a for a in out_node.args[0] if isinstance(a, fx.Node)]
    n_p = len(sig.params)
    updates = out_node.args[0][1:1 + n_p] + out_node.args[0][1 + n_p:]

    # ops that some update needs (reverse reachability from the updated tensors and state)
    needed: set[fx.Node] = set()
    stack = [a for a in updates if isinstance(a, fx.Node)]
    while stack:
        n = stack.pop()
        if n in needed:
            continue
        needed.add(n)
        stack.extend(n.all_input_nodes)
    dead_backward = [n for n in nodes if n.op == "call_function" and phase_of(n) == "backward"
                     and n not in needed and not n.is_impure()]
    if dead_backward:
        names = ", ".join(n.name for n in dead_backward[:8])
        problems.append(f"{len(dead_backward)} backward op(s) feed no trainable tensor's gradient ({names}"
                        f"{' ...' if len(dead_backward) > 8 else ''}): a frozen tensor or an activation below "
                        "every adapter gets a gradient; check the roles (frozen tensors must not require grad)")

    # every trainable tensor's raw gradient depends on the loss
    from_loss: set[fx.Node] = set()
    for n in nodes:
        if phase_of(n) == "loss" or any(a in from_loss for a in n.all_input_nodes):
            from_loss.add(n)
    grads: dict[str, list[fx.Node]] = {p: [] for p in sig.params}
    for n in nodes:
        for p in (n.meta.get(META_KEY) or {}).get("grad_of", []):
            grads.setdefault(p, []).append(n)
    for p in sig.params:
        if not grads.get(p):
            problems.append(f"no gradient node is marked for trainable tensor {p}")
        elif not any(g in from_loss for g in grads[p]):
            problems.append(f"trainable tensor {p} receives no gradient (the loss does not depend on it): "
                            "exclude its layer from the plan, or check that the loss reads the output it feeds")

    phases: dict[str, int] = {}
    for n in nodes:
        if n.op == "call_function":
            ph = phase_of(n)
            phases[ph] = phases.get(ph, 0) + 1
    # forward ops that depend on a trainable tensor: the part of the model the backward must cover
    placeholders = [n for n in nodes if n.op == "placeholder"]
    trainable_inputs = set(placeholders[:n_p])
    requires_grad: set[fx.Node] = set(trainable_inputs)
    for n in nodes:
        if phase_of(n) in ("forward", "loss") and any(a in requires_grad for a in n.all_input_nodes):
            requires_grad.add(n)
    forward_ops = [n for n in nodes if n.op == "call_function" and phase_of(n) == "forward"]
    return {
        "problems": problems,
        "ops_by_phase": phases,
        "forward_ops": len(forward_ops),
        "forward_ops_needing_grad": sum(1 for n in forward_ops if n in requires_grad),
        "backward_ops": phases.get("backward", 0),
        "dead_backward_ops": len(dead_backward),
        "outputs": len(outputs),
    }


@register_pass
class CheckGradientFlow(PassBase):
    """Verifies that only trainable tensors get gradients and that no backward op is wasted;
    raises :class:`~graphpeft.errors.VerificationError` listing every violation."""

    name = "check_gradient_flow"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        findings = gradient_flow(gm)
        graph_meta(gm)["gradient_flow"] = findings
        if findings["problems"]:
            raise VerificationError("gradient flow: " + "; ".join(findings["problems"]))
        return PassResult(gm, False)
