"""The verifier: graph lint plus graphpeft's invariants, run after every pass in tests.

Invariants: every tensor has a role and every role a tensor; ``requires_grad`` agrees with the
role (frozen tensors get no gradient); every trainable tensor is used; nodes created by passes
carry provenance, and their recorded shape and dtype agree with what their op computes.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from .errors import VerificationError
from .graph import META_KEY, Role, fake_eval, fake_mode_of, get_tensor, roles

_ADAPTER_ROLES = (Role.ADAPTER, Role.ADAPTER_CONST)

#: per node, what its last passing shape check evaluated (target, arguments, their and its own
#: fake values): a pipeline verifies after every pass, and re-evaluating every unchanged node on
#: fake tensors each time was ~15 % of a build
_checked: "weakref.WeakKeyDictionary[fx.Node, list[Any]]" = weakref.WeakKeyDictionary()


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


def _check_key(node: fx.Node) -> list[Any]:
    """What the shape check reads: the target, the arguments with each node as its fake value (no
    node is kept: a node leads to its graph and module), and the recorded value."""
    leaves, spec = pytree.tree_flatten((node.args, node.kwargs), is_leaf=lambda a: isinstance(a, fx.Node))
    return [node.target, spec, node.meta.get("val"),
            *[a.meta.get("val") if isinstance(a, fx.Node) else a for a in leaves]]


def _same(a: Any, b: Any) -> bool:
    """Identity for tensors (fake values are replaced, not edited), equality for the rest."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or type(a) is not type(b):
        return False
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an argument without a plain equality: check again
        return False


def _shape_problem(fake_mode, node: fx.Node) -> Optional[str]:
    recorded = node.meta.get("val")
    if not isinstance(recorded, torch.Tensor):
        return None
    key = _check_key(node)
    last = _checked.get(node)
    if last is not None and len(last) == len(key) and all(_same(a, b) for a, b in zip(last, key)):
        return None  # evaluated on these very inputs before, and it agreed
    try:
        actual = fake_eval(fake_mode, node.target, node.args, node.kwargs)
    except Exception as e:  # noqa: BLE001
        return f"node {node.name} ({node.target}) fails on its inputs' shapes: {e}"
    if isinstance(actual, torch.Tensor) and (actual.dtype != recorded.dtype or
                                             list(actual.shape) != list(recorded.shape)):
        return (f"node {node.name} records {recorded.dtype}{list(recorded.shape)} but computes "
                f"{actual.dtype}{list(actual.shape)}")
    _checked[node] = key
    return None
