"""Match -> check -> rewrite rules with reasons (after onnxscript's rewriter and tinygrad's
PatternMatcher): a :class:`RewritePass` runs a list of :class:`RewriteRule` objects over a graph
and records every :class:`MatchResult`, so "why did my rule not hit ``q_proj``?" has an answer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import torch.fx as fx

from .infra import PassBase, PassContext, PassResult


@dataclasses.dataclass
class MatchResult:
    """The outcome of matching (and checking) one rule at one node."""

    rule: str
    node: Optional[fx.Node]
    ok: bool
    reason: str = ""
    origin: str = ""  # module path of the matched layer, if any
    bindings: dict[str, Any] = dataclasses.field(default_factory=dict)
    stage: str = "match"  # "match" | "check" | "rewrite"

    @classmethod
    def success(cls, rule: str, node: fx.Node, origin: str = "", **bindings: Any) -> "MatchResult":
        return cls(rule, node, True, "", origin, bindings)

    @classmethod
    def fail(cls, rule: str, node: Optional[fx.Node], reason: str, origin: str = "",
             stage: str = "match") -> "MatchResult":
        return cls(rule, node, False, reason, origin, {}, stage)

    def __bool__(self) -> bool:
        return self.ok


class RewriteRule:
    """One rewrite: ``match`` a node, ``check`` the match can be rewritten, ``rewrite`` it.

    ``match`` returns a failed :class:`MatchResult` with a reason for nodes it does not want
    (return None instead for nodes not worth reporting: most of the graph); ``check`` returns
    None to accept or a reason to decline.
    """

    name: str = "rule"

    def match(self, gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> Optional[MatchResult]:
        raise NotImplementedError

    def check(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> Optional[str]:
        return None

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        raise NotImplementedError


class RewritePass(PassBase):
    """Applies its rules once to every node present when the pass starts (in graph order).
    With ``sweep_dead_code``, the nodes a rewrite left unread are erased after a modifying run
    (a rule that replaces a whole subgraph by one node rewires only its root)."""

    in_place = True
    sweep_dead_code = False

    def __init__(self, rules: Sequence[RewriteRule]) -> None:
        self.rules = list(rules)
        self.results: list[MatchResult] = []

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        modified = False
        self.results = []
        for node in list(gm.graph.nodes):
            for rule in self.rules:
                m = rule.match(gm, node, ctx)
                if m is None:
                    continue
                if m.ok:
                    reason = rule.check(gm, m, ctx)
                    if reason is not None:
                        m = MatchResult.fail(rule.name, node, reason, m.origin, stage="check")
                    else:
                        rule.rewrite(gm, m, ctx)
                        m.stage = "rewrite"
                        modified = True
                self.results.append(m)
                ctx.report.append(m)
                if m.ok:
                    break  # a node is rewritten by at most one rule per pass
        if modified and self.sweep_dead_code:
            gm.graph.eliminate_dead_code()
        return PassResult(gm, modified)

    def match_count(self, rule: Optional[str] = None) -> int:
        return sum(1 for m in self.results if m.ok and (rule is None or m.rule == rule))
