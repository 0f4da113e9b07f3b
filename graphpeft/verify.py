"""The verifier: graph lint plus graphpeft's invariants, run after every pass in tests.

Invariants: every tensor has a role and every role a tensor; ``requires_grad`` agrees with the
role (frozen tensors get no gradient); every trainable tensor is used; nodes created by passes
carry provenance, and their recorded shape and dtype agree with what their op computes.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from .errors import VerificationError
from .graph import META_KEY, Role, fake_eval, fake_mode_of, get_tensor, roles

_ADAPTER_ROLES = (Role.ADAPTER, Role.ADAPTER_CONST)


def verify(gm: fx.GraphModule, *, check_shapes: bool = True) -> None:
    """Raise :class:`VerificationError` listing every broken invariant of ``gm``."""
    problems: list[str] = []
    try:
        gm.graph.lint()
    except Exception as e:  # noqa: BLE001 - lint raises plain RuntimeError
        problems.append(f"graph lint: {e}")
    role_map = roles(gm)
    tensor_names = {n for n, _ in gm.named_parameters(remove_duplicate=False)}
    tensor_names |= {n for n, _ in gm.named_buffers(remove_duplicate=False)}
    for name in sorted(tensor_names - set(role_map)):
        problems.append(f"tensor {name} has no role")
    for name in sorted(set(role_map) - tensor_names):
        problems.append(f"role recorded for {name}, which is not a tensor of the graph")
    used: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in role_map:
            used[node.target] = used.get(node.target, 0) + len(node.users)
    for name, role in role_map.items():
        if name not in tensor_names:
            continue
        t = get_tensor(gm, name)
        if isinstance(t, torch.nn.Parameter) and t.requires_grad != role.trainable:
            problems.append(f"{name} has role {role.value} but requires_grad={t.requires_grad}")
        if role.trainable and not used.get(name):
            problems.append(f"trainable tensor {name} ({role.value}) is not used by the graph")
    fake_mode = fake_mode_of(gm) if check_shapes else None
    for node in gm.graph.nodes:
        if node.op == "get_attr" and role_map.get(node.target) in _ADAPTER_ROLES:
            for user in [node, *node.users]:
                if META_KEY not in user.meta:
                    problems.append(f"node {user.name} uses adapter tensor {node.target} but has no provenance")
        if fake_mode is not None and META_KEY in node.meta and node.op == "call_function":
            why = _shape_problem(fake_mode, node)
            if why:
                problems.append(why)
    if problems:
        raise VerificationError("; ".join(problems))


def _shape_problem(fake_mode, node: fx.Node) -> Optional[str]:
    recorded = node.meta.get("val")
    if not isinstance(recorded, torch.Tensor):
        return None
    try:
        actual = fake_eval(fake_mode, node.target, node.args, node.kwargs)
    except Exception as e:  # noqa: BLE001
        return f"node {node.name} ({node.target}) fails on its inputs' shapes: {e}"
    if isinstance(actual, torch.Tensor) and (actual.dtype != recorded.dtype or
                                             list(actual.shape) != list(recorded.shape)):
        return (f"node {node.name} records {recorded.dtype}{list(recorded.shape)} but computes "
                f"{actual.dtype}{list(actual.shape)}")
    return None
