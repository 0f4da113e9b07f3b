"""graphpeft demo (``make demo``): LoRA on a small Llama, end to end, in well under a minute.

1. build a small Llama from a config (random weights, no download);
2. compile it with a LoRA plan (q_proj, v_proj, o_proj);
3. train the adapters in PyTorch on a generated task: continue a fixed cycle of 16 tokens;
4. merge the adapters into the base weights;
5. export merged and unmerged ONNX, run both in onnxruntime and compare with torch;
6. save the adapter and read it back;
7. print a short report.

Run ``python examples/demo.py --help`` for the options; ``--quick`` trains fewer steps (tests).
Everything is written under ``--out`` (default ``demo_out/``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
import warnings
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

import graphpeft as gp
from graphpeft.adapter_io import read_adapter
from graphpeft.backends.onnx import OnnxRunner, max_abs_diff
from graphpeft.graph import op_count

VOCAB = 256
CYCLE = 16
PARITY_TOL = 1e-4  # max |ORT - torch| on logits, float32
# adapters after 5 AdamW steps in two runtimes, relative to each tensor's largest entry: AdamW
# divides each update by its gradient's running RMS, so a last-bit difference in a tiny gradient
# (the torch runner's silu and fused-AdamW kernels round in another order) moves an entry by up to lr
TRAIN_PARITY_TOL = 1e-3
TRAIN_PARITY = "ORT train step adapters vs torch (rel)"


def parity_tol(key: str) -> float:
    """The tolerance of the parity entry ``key``."""
    return TRAIN_PARITY_TOL if key == TRAIN_PARITY else PARITY_TOL


# --- configuration and report -----------------------------------------------------------------


@dataclasses.dataclass
class DemoConfig:
    out: str = "demo_out"
    steps: int = 60
    batch: int = 16
    seq: int = 24
    lr: float = 3e-2
    seed: int = 0
    progress: bool = True


@dataclasses.dataclass
class DemoReport:
    """Everything the demo measured; ``main`` returns it (tests read it)."""

    trainable: int = 0
    total: int = 0
    matched: list[str] = dataclasses.field(default_factory=list)
    skipped: int = 0
    losses: list[float] = dataclasses.field(default_factory=list)
    acc_before: float = 0.0
    acc_after: float = 0.0
    ops: dict[str, int] = dataclasses.field(default_factory=dict)
    parity: dict[str, float] = dataclasses.field(default_factory=dict)
    files: dict[str, int] = dataclasses.field(default_factory=dict)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    sample: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # for later sections

    @property
    def loss_fell(self) -> bool:
        return len(self.losses) > 1 and self.losses[-1] < 0.5 * self.losses[0]

    @property
    def parity_ok(self) -> bool:
        return bool(self.parity) and all(v <= parity_tol(k) for k, v in self.parity.items())

    @property
    def ok(self) -> bool:
        return self.loss_fell and self.parity_ok


class Timer:
    """``with timer("stage"):`` records wall seconds into ``report.timings``."""

    def __init__(self, report: DemoReport) -> None:
        self.report = report

    def __call__(self, name: str) -> "Timer":
        self._name = name
        return self

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        self.report.timings[self._name] = time.perf_counter() - self._start


# --- model and task ---------------------------------------------------------------------------


def build_model(seed: int) -> torch.nn.Module:
    """A small Llama from a config. ``initializer_range=0.2`` gives the frozen output head
    weights large enough to express confident predictions (the default 0.02 caps the logits)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


class CycleTask:
    """Sequences that walk a fixed cycle of ``CYCLE`` tokens (picked by the seed) from a random
    start: the model must learn which token follows which."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.cycle = torch.randperm(VOCAB, generator=self.gen)[:CYCLE]

    def batch(self, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, next-token targets), both ``(batch, seq)``."""
        start = torch.randint(0, CYCLE, (batch, 1), generator=self.gen)
        tokens = self.cycle[(start + torch.arange(seq + 1)) % CYCLE]
        return tokens[:, :-1], tokens[:, 1:]


def logits_of(model: Any, x: torch.Tensor) -> torch.Tensor:
    return model(x).logits


@torch.no_grad()
def accuracy(model: Any, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits_of(model, x).argmax(-1) == y).float().mean())


# --- the stages -------------------------------------------------------------------------------


def compile_model(model: torch.nn.Module, example: torch.Tensor) -> gp.CompiledModel:
    plan = gp.Plan([gp.LoRA(targets=["q_proj", "v_proj", "o_proj"], r=8, alpha=16)])
    return gp.compile(model, plan, example_inputs=(example,), example_kwargs={"use_cache": False})


def train_torch(cm: gp.CompiledModel, task: CycleTask, cfg: DemoConfig) -> list[float]:
    """Plain PyTorch training of the adapters: AdamW over ``cm.trainable_parameters()``."""
    from tqdm import tqdm

    cm.train()
    opt = torch.optim.AdamW(cm.trainable_parameters().values(), lr=cfg.lr)
    losses = []
    bar = tqdm(range(cfg.steps), desc="train (torch)", unit="step", disable=not cfg.progress,
               dynamic_ncols=True, leave=True)
    for _ in bar:
        x, y = task.batch(cfg.batch, cfg.seq)
        loss = F.cross_entropy(logits_of(cm, x).reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    cm.eval()
    return losses


# >>> SECTION: ONNX training step (reserved) >>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>
# To be filled in: export the compiled training step (forward, pruned backward, AdamW update)
# to ONNX and train a few steps in onnxruntime beside torch, comparing losses and weights.
# Put results in ``report.extra`` (e.g. report.extra["onnx_train"] = {...}) and print them in
# ``print_report``'s marked place. Called from ``main`` after ``train_torch``.
def onnx_training_section(cm: gp.CompiledModel, task: CycleTask, cfg: DemoConfig,
                          report: DemoReport, timer: Timer, steps: int = 5) -> None:
    """Compile the training step (forward, pruned backward, AdamW) into one graph, export it to
    ONNX and train ``steps`` more steps in plain onnxruntime and in torch on the same batches,
    from the same start: losses side by side, and the largest difference in the adapters."""
    from graphpeft.backends.onnx import OnnxTrainer

    # the plan has no adapter dropout, so both runtimes compute exactly the same step
    batches = [task.batch(cfg.batch, cfg.seq) for _ in range(steps)]
    with timer("compile training step"):
        step = cm.compile_training("cross_entropy", gp.optim.AdamW(lr=cfg.lr / 10), example_batch=batches[0])
    path = os.path.join(cfg.out, "train_step.onnx")
    with timer("export training step"):
        step.export_onnx(path)  # carries the current adapters and optimizer state as defaults
    report.files["train_step.onnx"] = os.path.getsize(path)
    trainer = OnnxTrainer(path)
    with timer(f"train {steps} steps (onnxruntime)"):
        ort_losses = [float(trainer.step(x, y)) for x, y in batches]
    with timer(f"train {steps} steps (compiled, torch)"):
        torch_losses = [float(step(x, y)) for x, y in batches]
    ours, theirs = cm.adapter_state_dict(), trainer.adapter_state_dict()
    rel = max(float((ours[k] - torch.as_tensor(theirs[k])).abs().max() / ours[k].abs().max().clamp_min(1e-12))
              for k in ours)
    report.extra["onnx_train"] = {"torch": torch_losses, "onnxruntime": ort_losses,
                                  "adapter_rel_diff": rel, "graph_nodes": len(step.graph_module.graph.nodes)}
    report.parity[TRAIN_PARITY] = rel




def export_and_check(cm: gp.CompiledModel, merged: gp.CompiledModel, task: CycleTask, cfg: DemoConfig,
                     report: DemoReport, timer: Timer) -> None:
    """Export merged and unmerged ONNX, run both in onnxruntime, compare with torch."""
    x, _ = task.batch(3, 11)  # another batch size and length than at compile time: dynamic shapes
    with torch.no_grad():
        ref = logits_of(cm, x)
        ref_merged = logits_of(merged, x)
    report.parity["torch merged vs unmerged"] = float((ref - ref_merged).abs().max())
    for name, is_merged in (("merged", True), ("unmerged", False)):
        path = os.path.join(cfg.out, f"{name}.onnx")
        with timer(f"export {name} ONNX"):
            result = cm.export_onnx(path, merged=is_merged)
        report.files[f"{name}.onnx"] = result.bytes
        report.ops[f"{name} ONNX nodes"] = result.num_nodes
        with timer(f"onnxruntime {name}"):
            runner = OnnxRunner(path)
            got = runner.run(cm.flat_inputs(x))
        report.parity[f"onnxruntime {name} vs torch"] = max_abs_diff(got[:1], [ref])
    report.sample = greedy_sample(os.path.join(cfg.out, "merged.onnx"), task)


def greedy_sample(path: str, task: CycleTask, prompt: int = 4, new: int = 8) -> dict[str, list[int]]:
    """Continue a prompt with the merged ONNX model in onnxruntime (greedy)."""
    runner = OnnxRunner(path)
    tokens = task.cycle[:prompt].tolist()
    for _ in range(new):
        logits = runner.run([torch.tensor([tokens])])[0]
        tokens.append(int(logits[0, -1].argmax()))
    expected = task.cycle[(torch.arange(prompt + new)) % CYCLE].tolist()
    return {"prompt": tokens[:prompt], "generated": tokens[prompt:], "expected": expected[prompt:]}


def save_and_check_adapter(cm: gp.CompiledModel, cfg: DemoConfig, report: DemoReport) -> None:
    folder = os.path.join(cfg.out, "adapter")
    cm.save_adapter(folder)
    _, state = read_adapter(folder)
    own = cm.adapter_state_dict()
    assert set(state) == set(own) and all(torch.equal(state[k], own[k]) for k in own), "adapter round trip"
    for f in sorted(os.listdir(folder)):
        report.files[f"adapter/{f}"] = os.path.getsize(os.path.join(folder, f))


# --- report -----------------------------------------------------------------------------------


def sparkline(values: Sequence[float], width: int = 40) -> str:
    if not values:
        return ""
    if len(values) > width:
        step = len(values) / width
        values = [values[int(i * step)] for i in range(width - 1)] + [values[-1]]
    bars = "▁▂▃▄▅▆▇█"
    try:
        bars.encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        bars = "_.-=+*#@"
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(bars[min(len(bars) - 1, int((v - lo) / span * len(bars)))] for v in values)


def _size(n: int) -> str:
    return f"{n / 1024:,.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:,.2f} MiB"


def print_report(report: DemoReport, cfg: DemoConfig) -> None:
    p = print
    p("\n=== graphpeft demo: LoRA on a small Llama ===")
    pct = 100.0 * report.trainable / max(report.total, 1)
    p(f"trainable parameters : {report.trainable:,} of {report.total:,} ({pct:.2f} %)")
    p(f"matched layers       : {len(report.matched)} (left alone: {report.skipped})")
    for line in report.matched:
        p(f"    {line}")
    L = report.losses
    marks = sorted({0, len(L) // 4, len(L) // 2, 3 * len(L) // 4, len(L) - 1})
    p(f"loss ({len(L)} steps)     : " + "  ".join(f"#{i}: {L[i]:.3f}" for i in marks))
    p(f"                       {sparkline(L)}")
    p(f"next-token accuracy  : {report.acc_before:.1%} before -> {report.acc_after:.1%} after training")
    if report.sample:
        s = report.sample
        ok = "matches" if s["generated"] == s["expected"] else "differs from"
        p(f"onnxruntime greedy   : prompt {s['prompt']} -> {s['generated']} ({ok} the cycle)")
    if "onnx_train" in report.extra:
        t = report.extra["onnx_train"]
        p(f"training step graph  : {t['graph_nodes']} nodes (forward + pruned backward + AdamW), "
          "trained in onnxruntime beside torch:")
        for i, (a, b) in enumerate(zip(t["torch"], t["onnxruntime"])):
            p(f"    step {i}: torch {a:.6f}   onnxruntime {b:.6f}")
    p("graph ops            : " + ", ".join(f"{k} {v}" for k, v in report.ops.items()))
    p(f"parity (max |diff| on logits, tolerance {PARITY_TOL:g}; training step {TRAIN_PARITY_TOL:g}):")
    for k, v in report.parity.items():
        p(f"    {k:30s} {v:.2e}  {'ok' if v <= parity_tol(k) else 'FAIL'}")
    p(f"files in {cfg.out}/:")
    for k, v in report.files.items():
        p(f"    {k:34s} {_size(v):>12s}")
    p("timings:")
    for k, v in report.timings.items():
        p(f"    {k:28s} {v:7.2f} s")
    p("result: " + ("OK" if report.ok else "FAILED (loss did not fall or parity off)"))


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]]) -> DemoConfig:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="train fewer steps (for tests)")
    ap.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 60, 30 with --quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    steps = a.steps if a.steps is not None else (30 if a.quick else 60)
    return DemoConfig(out=a.out, steps=steps, seed=a.seed, progress=not a.no_progress)


def _quiet() -> None:
    """Silence third-party chatter (torch.export / torch.onnx warnings) for a readable report."""
    warnings.filterwarnings("ignore")
    for name in ("torch.onnx", "torch._export", "torch.export", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: Optional[Sequence[str]] = None) -> DemoReport:
    cfg = parse_args(argv)
    _quiet()
    os.makedirs(cfg.out, exist_ok=True)
    report = DemoReport()
    timer = Timer(report)
    task = CycleTask(cfg.seed)
    model = build_model(cfg.seed)
    example, _ = task.batch(2, 8)

    with timer("compile"):
        cm = compile_model(model, example)
    report.trainable = cm.num_parameters(trainable_only=True)
    report.total = cm.num_parameters()
    params = cm.trainable_parameters()
    report.matched = [f"{path}  ({rec['method']} on {rec['kind']}, r={params[rec['tensors']['A']].shape[0]}, "
                      f"scaling={rec['scaling']:g})" for path, rec in cm.adapters().items()]
    report.skipped = len(gp.find_layers(cm.graph_module)) - len(report.matched)

    x_eval, y_eval = task.batch(64, cfg.seq)
    cm.eval()
    report.acc_before = accuracy(cm, x_eval, y_eval)
    with timer(f"train {cfg.steps} steps (torch)"):
        report.losses = train_torch(cm, task, cfg)
    report.acc_after = accuracy(cm, x_eval, y_eval)

    onnx_training_section(cm, task, cfg, report, timer)

    with timer("merge"):
        merged = cm.merge()
    report.ops = {"base": cm.base_op_count, "adapted": op_count(cm.graph_module),
                  "merged": op_count(merged.graph_module)}
    export_and_check(cm, merged, task, cfg, report, timer)
    with timer("save adapter"):
        save_and_check_adapter(cm, cfg, report)
    print_report(report, cfg)
    return report


if __name__ == "__main__":
    sys.exit(0 if main(sys.argv[1:]).ok else 1)
