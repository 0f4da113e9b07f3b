"""Freeze: every tensor not named trainable by a rule is frozen (no gradient, ever)."""

from __future__ import annotations

import torch
import torch.fx as fx

from graphpeft.graph import get_tensor, roles
from graphpeft.infra import PassBase, PassContext, PassResult
from graphpeft.registry import register_pass


@register_pass
class Freeze(PassBase):
    """Sets ``requires_grad`` from roles: only adapter / trainable tensors get gradients."""

    name = "freeze"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        changed = False
        for name, role in roles(gm).items():
            t = get_tensor(gm, name)
            if isinstance(t, torch.nn.Parameter) and t.requires_grad != role.trainable:
                t.requires_grad_(role.trainable)
                changed = True
        return PassResult(gm, changed)

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        from graphpeft.errors import VerificationError

        for name, p in gm.named_parameters():
            if p.requires_grad and not roles(gm)[name].trainable:
                raise VerificationError(f"{name} is {roles(gm)[name].value} but still requires grad")
