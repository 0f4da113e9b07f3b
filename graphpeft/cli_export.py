"""``graphpeft export``: compile a model with a plan and write what an edge team ships.

::

    graphpeft export MODEL --plan PLAN.yaml --target onnx|ort|executorch --out DIR
                     [--train] [--adapter FOLDER] [--unmerged] [--batch 1] [--seq 16]

``MODEL`` is a transformers model folder (``config.json`` and weights: ``save_pretrained``), a
folder or ``config.json`` without weights (random initialisation, for trying a shape), or
``module:factory``: a callable returning an ``nn.Module``, or ``(module, example_inputs)``.

Every file written is run by its runtime and compared with torch; the summary table (and
``DIR/summary.json``) lists files, sizes and parity figures. Each file is written atomically.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import json
import logging
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

import torch

log = logging.getLogger("graphpeft.cli")

TARGETS = ("onnx", "ort", "executorch")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class CliInputError(Exception):
    """Bad input to the command line: the message says what to do."""


@dataclasses.dataclass
class LoadedModel:
    """The model to compile, one call's inputs, and what training it needs."""

    model: torch.nn.Module
    args: tuple
    kwargs: dict[str, Any]
    loss: Optional[str] = None  # a built-in loss for --train, when the model's head implies one
    targets: tuple = ()  # loss targets for --train (labels), after the model inputs
    source: str = ""


@dataclasses.dataclass
class Artifact:
    """One written file and how closely its runtime matched torch."""

    kind: str
    path: str
    parity: Optional[float] = None
    parity_name: str = ""
    extra_files: list[str] = dataclasses.field(default_factory=list)

    def files(self) -> list[str]:
        return [self.path] + [p for p in self.extra_files if p]


class Progress:
    """Numbered progress lines on standard error (the command line's own output)."""

    def __init__(self, total: int, quiet: bool = False) -> None:
        self.total, self.done, self.quiet, self.t0 = total, 0, quiet, time.perf_counter()

    def __call__(self, what: str) -> None:
        self.done += 1
        if not self.quiet:
            print(f"[{self.done}/{self.total}] {what} ({time.perf_counter() - self.t0:.1f} s)", file=sys.stderr,
                  flush=True)


# --- the model --------------------------------------------------------------------------------


def load_model(spec: str, batch: int, seq: int) -> LoadedModel:
    """``spec``: a transformers folder or config.json, or ``module:factory``."""
    if os.path.isdir(spec) or spec.endswith(".json"):
        return _load_transformers(spec, batch, seq)
    if ":" in spec and not os.path.exists(spec):
        return _load_factory(spec)
    raise CliInputError(f"MODEL {spec!r} is neither a folder, a config.json nor module:factory; pass a "
                        f"transformers folder (save_pretrained), its config.json, or package.module:function")


def _load_factory(spec: str) -> LoadedModel:
    module_name, _, attr = spec.partition(":")
    sys.path.insert(0, os.getcwd())  # like python -m: the current folder's modules import
    try:
        factory: Callable[[], Any] = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise CliInputError(f"cannot import {spec!r}: {e}; MODEL takes module:function, the function "
                            f"returning an nn.Module or (module, example_inputs)") from e
    finally:
        sys.path.pop(0)
    made = factory()
    model, args = (made if isinstance(made, tuple) else (made, ()))
    if not isinstance(model, torch.nn.Module):
        raise CliInputError(f"{spec} returned {type(model).__name__}, not an nn.Module (or (module, inputs))")
    if not args:
        raise CliInputError(f"{spec} returned a module without example inputs: return (module, example_inputs) "
                            f"so graphpeft can trace one call")
    return LoadedModel(model.eval(), tuple(args) if isinstance(args, (tuple, list)) else (args,), {},
                       source=spec)


def _load_transformers(spec: str, batch: int, seq: int) -> LoadedModel:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the network from an export command
    import transformers

    folder = spec if os.path.isdir(spec) else os.path.dirname(os.path.abspath(spec))
    config_path = spec if spec.endswith(".json") else os.path.join(spec, "config.json")
    if not os.path.isfile(config_path):
        raise CliInputError(f"{spec!r} has no config.json: pass a folder written by save_pretrained")
    config = transformers.AutoConfig.from_pretrained(config_path, local_files_only=True)
    cls = _model_class(transformers, config)
    has_weights = os.path.isdir(spec) and any(os.path.exists(os.path.join(folder, f)) for f in WEIGHT_FILES)
    if has_weights:
        model = cls.from_pretrained(folder, local_files_only=True)
    else:
        log.warning("%s: no weights found, random initialisation (for trying shapes)", spec)
        model = cls._from_config(config)
    args, kwargs, loss, targets = _example_inputs(model, config, batch, seq)
    source = f"{cls.__name__} ({'pretrained' if has_weights else 'random weights'})"
    return LoadedModel(model.eval(), args, kwargs, loss, targets, source)


def _model_class(transformers: Any, config: Any) -> Any:
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def _example_inputs(model: Any, config: Any, batch: int, seq: int) -> tuple[tuple, dict, Optional[str], tuple]:
    gen = torch.Generator().manual_seed(0)
    head = type(model).__name__
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        size = getattr(config, "image_size", 32)
        size = size if isinstance(size, int) else size[0]
        pixels = torch.randn(batch, getattr(config, "num_channels", 3), size, size, generator=gen)
        return (pixels,), {}, _classification_loss(head), _labels(config, batch, gen, head)
    if getattr(config, "is_encoder_decoder", False):
        raise CliInputError(f"{head} is an encoder-decoder; the command line traces decoder-only and encoder "
                            f"models; compile it from Python with gp.compile(model, plan, example_inputs=...)")
    vocab = int(getattr(config, "vocab_size", 1000))
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    kwargs: dict[str, Any] = {"attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    if hasattr(config, "use_cache"):
        kwargs["use_cache"] = False
    if head.endswith("ForCausalLM"):
        return (ids,), kwargs, "causal_lm", ()
    return (ids,), kwargs, _classification_loss(head), _labels(config, batch, gen, head)


def _classification_loss(head: str) -> Optional[str]:
    return "cross_entropy" if "ForSequenceClassification" in head or "ForImageClassification" in head else None


def _labels(config: Any, batch: int, gen: torch.Generator, head: str) -> tuple:
    if _classification_loss(head) is None:
        return ()
    return (torch.randint(0, int(getattr(config, "num_labels", 2)), (batch,), generator=gen),)


# --- plan, adapter, compile -------------------------------------------------------------------


def read_plan(path: Optional[str]) -> Any:
    from .plan import Plan

    if path is None:
        return None
    if not os.path.isfile(path):
        raise CliInputError(f"plan file {path!r} does not exist")
    return Plan.from_json(path) if path.lower().endswith(".json") else Plan.from_yaml(path)


def _is_peft_folder(folder: str) -> bool:
    try:
        with open(os.path.join(folder, "adapter_config.json")) as f:
            return "peft_type" in json.load(f)
    except (OSError, ValueError):
        return False


def compile_model(loaded: LoadedModel, plan: Any, adapter: Optional[str]) -> Any:
    """Compile with the plan; ``adapter``: a graphpeft adapter folder (loaded into the plan's
    adapters) or a peft folder (its config is the plan, so ``--plan`` is not needed)."""
    from .adapter_io import load_adapter
    from .api import compile as gp_compile
    from .peft_interop import import_peft

    if adapter is not None and not os.path.isdir(adapter):
        raise CliInputError(f"--adapter {adapter!r} is not a folder: pass the folder save_adapter() or "
                            f"peft's save_pretrained() wrote")
    if adapter is not None and _is_peft_folder(adapter):
        if plan is not None:
            log.warning("--adapter is a peft folder: its adapter_config.json is the plan; --plan is ignored")
        return import_peft(loaded.model, adapter, loaded.args, loaded.kwargs)
    if plan is None:
        raise CliInputError("no plan: pass --plan PLAN.yaml (or --adapter with a peft folder)")
    cm = gp_compile(loaded.model, plan, loaded.args, loaded.kwargs)
    if adapter is not None:
        load_adapter(cm, adapter)
    return cm


# --- exports with their parity ----------------------------------------------------------------


def _max_diff(got: Sequence[Any], want: Sequence[Any]) -> float:
    return max(float((torch.as_tensor(g).double() - w.detach().double()).abs().max()) for g, w in zip(got, want))


def export_inference(cm: Any, target: str, out: str, merged: bool) -> list[Artifact]:
    from .registry import get_backend

    inputs = list(cm.example_inputs)
    with torch.no_grad():
        outputs = cm.graph_module(*inputs)
    want = [t for t in torch.utils._pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]
    if target == "executorch":
        path = os.path.join(out, "model.pte")
        result = cm.export_executorch(path, merged=merged)
        got = get_backend("executorch").runner(path).run(inputs)
        return [Artifact(f"inference .pte ({'merged' if merged else 'unmerged'}, {result.delegate})", path,
                         _max_diff(got, want), "max abs vs torch", [getattr(result, "data_path", None) or ""])]
    path = os.path.join(out, "model.onnx")
    result = cm.export_onnx(path, merged=merged)
    backend = get_backend("onnx")
    arts = [Artifact(f"inference .onnx ({'merged' if merged else 'unmerged'})", path,
                     _max_diff(backend.runner(path).run(inputs), want), "max abs vs torch",
                     [getattr(result, "data_path", None) or ""])]
    if target == "ort":
        ort_path = backend.to_ort(path, os.path.join(out, "model.ort"))
        arts.append(Artifact("inference .ort", ort_path, _max_diff(backend.runner(ort_path).run(inputs), want),
                             "max abs vs torch"))
    return arts


def export_training(cm: Any, loaded: LoadedModel, target: str, out: str, loss: str, lr: float,
                    steps: int) -> list[Artifact]:
    """Export one AdamW training step; the runtime's trainer and a copy of the torch step run
    ``steps`` steps on the same batch and their losses are compared (relative)."""
    from .registry import get_backend
    from .training import optim

    targets = loaded.targets
    if loss == "mse" and not targets:  # a random target shaped like the first output
        with torch.no_grad():
            first = torch.utils._pytree.tree_leaves(cm.graph_module(*cm.example_inputs))[0]
        targets = (torch.randn(first.shape, generator=torch.Generator().manual_seed(1)),)
    cm.train()
    batch = (*cm.example_inputs, *targets)
    step = cm.compile_training(loss, optim.AdamW(lr=lr), example_batch=batch)
    reference = copy.deepcopy(step)  # the exported step starts from the same tensors
    suffix = "pte" if target == "executorch" else "onnx"
    path = os.path.join(out, f"train_step.{suffix}")
    backend = get_backend("executorch" if target == "executorch" else "onnx")
    if target == "executorch":
        step.export_executorch(path)
    else:
        step.export_onnx(path)
    run_path = backend.to_ort(path, os.path.join(out, "train_step.ort")) if target == "ort" else path
    # an .ort file does not carry the training signature readably: it is read from the .onnx
    trainer = backend.trainer(path, session_path=run_path) if target == "ort" else backend.trainer(path)
    got = [trainer.step(*batch) for _ in range(steps)]
    want = [float(reference(*batch)) for _ in range(steps)]
    rel = max(abs(g - w) / max(abs(w), 1e-12) for g, w in zip(got, want))
    measure = f"loss rel vs torch, {steps} steps"
    if _has_random_ops(step.graph_module):
        measure += "; dropout: each runtime draws its own masks"
        log.warning("the training step has random ops (dropout): the runtime and torch draw different "
                    "masks, so their losses differ by that noise; a plan without dropout compares exactly")
    kind = f"training step .{suffix} (AdamW, {loss})"
    if target == "ort":
        return [Artifact(kind, path), Artifact("training step .ort (run)", run_path, rel, measure)]
    return [Artifact(kind, path, rel, measure)]


def _has_random_ops(gm: torch.fx.GraphModule) -> bool:
    from .graph import is_random

    return any(n.op == "call_function" and is_random(n) for n in gm.graph.nodes)


# --- the command ------------------------------------------------------------------------------


def _size(path: str) -> int:
    return os.path.getsize(path) if os.path.isfile(path) else 0


def summary_rows(artifacts: Sequence[Artifact], out: str) -> list[dict[str, Any]]:
    rows = []
    for art in artifacts:
        for i, path in enumerate(art.files()):
            rows.append({"file": os.path.relpath(path, out), "what": art.kind if i == 0 else "  (its data)",
                         "bytes": _size(path), "parity": art.parity if i == 0 else None,
                         "measure": art.parity_name if i == 0 else ""})
    return rows


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    header = ("file", "what", "size", "parity")
    cells = [(r["file"], r["what"], f"{r['bytes'] / 1e6:.2f} MB",
              "" if r["parity"] is None else f"{r['parity']:.1e} ({r['measure']})") for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    print(line)
    print("  ".join("-" * w for w in widths))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def _check_out(out: str) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise CliInputError(f"--out {out!r} is a file; pass a folder (it is created if missing)")
    os.makedirs(out, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise CliInputError(f"--out {out!r} is not writable")


def run_export(args: argparse.Namespace) -> int:
    """The ``export`` sub-command; raises CliInputError or GraphPeftError on bad input."""
    _check_out(args.out)
    progress = Progress(4 + int(args.train), quiet=args.quiet)
    plan = read_plan(args.plan)
    loaded = load_model(args.model, args.batch, args.seq)
    progress(f"loaded {loaded.source}")
    cm = compile_model(loaded, plan, args.adapter)
    trainable = sum(p.numel() for p in cm.trainable_parameters().values())
    progress(f"compiled: {len(cm.adapters())} adapters, {trainable:,} trainable values")
    artifacts = export_inference(cm, args.target, args.out, merged=not args.unmerged)
    progress(f"exported inference for {args.target} and compared with torch")
    if args.train:
        loss = args.loss or loaded.loss
        if loss is None:
            raise CliInputError(f"--train needs a loss for {type(loaded.model).__name__}: pass --loss "
                                f"causal_lm|cross_entropy|mse (labels are random)")
        artifacts += export_training(cm, loaded, args.target, args.out, loss, args.lr, args.steps)
        progress(f"exported the training step for {args.target} and ran {args.steps} steps beside torch")
    rows = summary_rows(artifacts, args.out)
    summary = {"model": args.model, "target": args.target, "merged": not args.unmerged, "train": args.train,
               "files": rows}
    from .paths import atomic_write

    atomic_write(os.path.join(args.out, "summary.json"), json.dumps(summary, indent=2).encode())
    progress(f"wrote {os.path.join(args.out, 'summary.json')}")
    print_table(rows)
    return 0


def add_parser(sub: Any, handler: Callable[[argparse.Namespace], int]) -> None:
    """Register ``graphpeft export`` on the top-level sub-parsers."""
    p = sub.add_parser("export", help="compile a model with a plan and export it for a runtime (with parity)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="transformers folder or config.json, or module:factory")
    p.add_argument("--plan", help="plan file (YAML or JSON); not needed with a peft --adapter")
    p.add_argument("--target", choices=TARGETS, required=True, help="runtime to export for")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--train", action="store_true", help="also export one AdamW training step")
    p.add_argument("--adapter", help="adapter folder to load (graphpeft's save_adapter, or peft's)")
    p.add_argument("--unmerged", action="store_true", help="keep the adapter branch (default: merged)")
    p.add_argument("--batch", type=int, default=2, help="example batch size (default 2; 1 would fix the batch dimension)")
    p.add_argument("--seq", type=int, default=16, help="example sequence length (default 16)")
    p.add_argument("--loss", choices=("causal_lm", "cross_entropy", "mse"), help="loss of the training step")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of the training step")
    p.add_argument("--steps", type=int, default=3, help="training steps compared with torch (default 3)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=handler)
