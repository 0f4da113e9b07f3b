"""Shared test helpers: the tiny architectures, their inputs, and output comparison.

Every architecture is described once (:data:`ARCHS`): how to build it, a batch of inputs (of any
batch size / sequence length, for the dynamic-shape tests), the layers a typical LoRA plan
targets, and how ``peft`` names the same targets. Models are tiny (hidden 32, 2 layers, batch 2,
sequence 8) so the whole suite runs in a few minutes on 2 cores.

Parity figures (max abs differences against ``peft`` and onnxruntime) are collected through the
``parity`` fixture and printed at the end of the run.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Callable, Optional

import pytest
import torch
from torch.utils import _pytree as pytree

sys.path.insert(0, os.path.dirname(__file__))

import models as M  # noqa: E402

# under pytest-xdist (make test runs -n 2) each worker takes its share of the cores: torch's
# default of one thread per core in every worker oversubscribes them
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@dataclasses.dataclass
class Arch:
    """One test architecture: builder, inputs, LoRA targets, peft equivalents."""

    name: str
    build: Callable[[], torch.nn.Module]
    make_inputs: Callable[[int, int], tuple[tuple, dict]]
    targets: Any  # graphpeft LoRA targets for a typical plan
    peft_targets: Optional[list[str]] = None  # peft's target_modules for the same layers
    fan_in_fan_out: bool = False  # peft needs this for GPT-2's Conv1D

    def inputs(self, batch: int = 2, seq: int = 8) -> tuple[tuple, dict]:
        return self.make_inputs(batch, seq)


def _tokens(batch: int, seq: int) -> tuple[tuple, dict]:
    return (M.token_batch(batch=batch, seq=seq),), {"use_cache": False}


def _bert_inputs(batch: int, seq: int) -> tuple[tuple, dict]:
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq // 2:] = 0  # a real padding mask, so the mask is exercised as a graph input
    return (M.token_batch(batch=batch, seq=seq),), {"attention_mask": mask}


def _images(batch: int, seq: int) -> tuple[tuple, dict]:
    return (M.image_batch(batch=batch),), {}


ARCHS: dict[str, Arch] = {
    "llama": Arch("llama", M.tiny_llama, _tokens, ["q_proj", "v_proj", "down_proj"],
                  ["q_proj", "v_proj", "down_proj"]),
    "gpt2": Arch("gpt2", M.tiny_gpt2, _tokens, ["c_attn", "c_fc", "c_proj"], ["c_attn", "c_fc", "c_proj"],
                 fan_in_fan_out=True),
    "bert": Arch("bert", M.tiny_bert, _bert_inputs, ["query", "value", "output.dense"],
                 ["query", "value", "output.dense"]),
    "vit": Arch("vit", M.tiny_vit, _images, "all-linear"),
    "cnn": Arch("cnn", M.tiny_cnn, _images, ["layer1.conv2", "layer2.conv1", "layer2.down.0", "fc"],
                ["layer1.conv2", "layer2.conv1", "layer2.down.0", "fc"]),
}


def tensors_of(out: Any) -> list[torch.Tensor]:
    """Every tensor leaf of a model output (tensor, tuple, ModelOutput ...), in order."""
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


def max_diff(a: Any, b: Any) -> float:
    """Largest absolute difference between the tensor leaves of two outputs."""
    ta, tb = tensors_of(a), tensors_of(b)
    assert len(ta) == len(tb), f"{len(ta)} output tensors vs {len(tb)}"
    assert ta, "no tensor outputs"
    for x, y in zip(ta, tb):
        assert x.shape == y.shape, f"shape {tuple(x.shape)} vs {tuple(y.shape)}"
    return max(float((x.detach().double() - y.detach().double()).abs().max()) for x, y in zip(ta, tb))


def call_ops(gm: torch.fx.GraphModule) -> list[Any]:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def created_nodes(gm: torch.fx.GraphModule, origin: Optional[str] = None) -> list[torch.fx.Node]:
    """Nodes a pass created (they carry provenance), optionally only those of one layer."""
    out = []
    for n in gm.graph.nodes:
        prov = n.meta.get("graphpeft")
        if prov and (origin is None or prov.get("origin") == origin):
            out.append(n)
    return out


@pytest.fixture(scope="session")
def arch_specs() -> dict[str, Arch]:
    return ARCHS


class ParityLog:
    """Collects (what, figure) pairs; printed in the terminal summary."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float]] = []

    def record(self, what: str, value: float) -> float:
        self.rows.append((what, float(value)))
        return value


_PARITY = ParityLog()


@pytest.fixture(scope="session")
def parity() -> ParityLog:
    return _PARITY


class _WorkerParity:
    """Brings the parity figures of xdist workers to the controller, which prints them."""

    @pytest.hookimpl
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        import json

        _PARITY.rows.extend(json.loads(getattr(node, "workeroutput", {}).get("graphpeft_parity", "[]")))


def pytest_configure(config: Any) -> None:
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_WorkerParity(), "graphpeft-worker-parity")


def pytest_sessionfinish(session: Any) -> None:
    output = getattr(session.config, "workeroutput", None)  # set on xdist workers only
    if output is not None:
        import json

        output["graphpeft_parity"] = json.dumps(_PARITY.rows)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _PARITY.rows:
        terminalreporter.write_sep("-", "graphpeft parity figures (max abs diff)")
        for what, value in _PARITY.rows:
            terminalreporter.write_line(f"{what:55s} {value:.3e}")


@pytest.fixture(scope="session")
def random_lora():
    """name -> (model, model's state before compiling, CompiledModel with random A and B on the
    arch's typical targets, r=4). Compiled once per session and shared: tests must not mutate
    it (merge and export make copies)."""
    import copy

    import graphpeft as gp

    cache: dict = {}

    def get(name: str):
        if name not in cache:
            arch = ARCHS[name]
            model = arch.build()
            state = copy.deepcopy(model.state_dict())
            args, kwargs = arch.inputs()
            cm = gp.compile(model, gp.Plan([gp.LoRA(targets=arch.targets, r=4, alpha=8, init="random")]),
                            example_inputs=args, example_kwargs=kwargs)
            cm.eval()
            cache[name] = (model, state, cm)
        return cache[name]

    return get
