"""The ONNX training step before and after the export-side optimizations, in one process.

    python -m benchmarks.onnx_step                 # benchmark Llama (4 layers), 10 interleaved rounds
    python -m benchmarks.onnx_step --layers 2 --rounds 5

A/B pairs, each measured side by side so a loaded machine slows both alike:

- ``slice_scatter_onnx`` and ``fold_transposes_into_gemm`` off / on: ONNX op counts of the exported file and of onnxruntime's
  optimized graph (``Transpose``, ``ScatterND``), and the median step time of the two trainers
  run alternately;
- translation time of the step with ``rsub.Scalar`` rewritten (as exported) and left in (one op
  without a direct translation sends the exporter through its whole-graph re-decomposition);
- onnxruntime load without / with the saved optimized model (``OnnxTrainer(cache_optimized=...)``).
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import tempfile
import warnings
from typing import Any, Callable, Sequence

from .compile_time import LINEAR, batch, build_llama
from .harness import interleave


def _kinds(path: str) -> collections.Counter:
    import onnx

    return collections.Counter(n.op_type for n in onnx.load(path, load_external_data=False).graph.node)


def _optimized_kinds(path: str) -> collections.Counter:
    """Op counts of onnxruntime's optimized graph, and its stored tensors' MiB as ``"MiB"``."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.optimized_model_filepath = path + ".inspect.onnx"
    ort.InferenceSession(path, opts, disabled_optimizers=["CommonSubexpressionElimination"])
    out = _kinds(opts.optimized_model_filepath)
    model = onnx.load(opts.optimized_model_filepath)
    out["MiB"] = round(sum(onnx.numpy_helper.to_array(i).nbytes for i in model.graph.initializer) / 2**20, 2)
    return out


def _interleaved(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median seconds of each function, run alternately ``rounds`` times (no warm-up)."""
    return {k: st.median / 1000 for k, st in interleave(fns, warmup=0, repeats=rounds).items()}


def export_pair(step: Any, folder: str) -> dict[str, str]:
    """The step exported without and with ``slice_scatter_onnx`` and ``fold_transposes_into_gemm``."""
    from graphpeft.backends.onnx import train_export as te
    from graphpeft.rewrite import RewritePass
    from passes.legalize.slice_scatter_onnx import SliceScatterOnnx

    paths = {"before": os.path.join(folder, "before.onnx"), "after": os.path.join(folder, "after.onnx")}
    rules, fold = SliceScatterOnnx.__init__, te.fold_transposes_into_gemm
    SliceScatterOnnx.__init__ = lambda self: RewritePass.__init__(self, [])  # type: ignore[method-assign]
    te.fold_transposes_into_gemm = lambda model: 0
    try:
        step.export_onnx(paths["before"])
    finally:
        SliceScatterOnnx.__init__, te.fold_transposes_into_gemm = rules, fold  # type: ignore[method-assign]
    step.export_onnx(paths["after"])
    return paths


def translate_pair(step: Any, rounds: int) -> dict[str, float]:
    """Seconds to translate the legalized step to ONNX, as exported, and with ``rsub.Scalar`` left
    in the graph (``legalize_onnx`` without its rsub rule): one op without a direct translation
    sends the exporter through its whole-graph decomposition."""
    import torch

    import passes.legalize.legalize_onnx as lo
    from graphpeft.backends.onnx import train_export as te

    sig = te.signature_of(step.graph_module)
    names = [s.name for s in sig.inputs], [s.name for s in sig.outputs]
    rule = lo._equivalent
    graphs = {"direct": te.legalized_copy(step.graph_module)[0]}
    lo._equivalent = lambda node: None if node.target == torch.ops.aten.rsub.Scalar else rule(node)
    try:
        graphs["re-decomposed"] = te.legalized_copy(step.graph_module)[0]
    finally:
        lo._equivalent = rule
    te._translate_fast(te.exported_program(graphs["direct"]), *names, None)  # the op registry, once
    return _interleaved({k: (lambda gm=gm: te._translate_fast(te.exported_program(gm), *names, None))
                         for k, gm in graphs.items()}, rounds)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--parts", default="ops,translate,load", help="which comparisons to run")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    for name in ("torch", "onnxscript", "onnx_ir", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import graphpeft as gp
    from graphpeft.backends.onnx import OnnxTrainer

    ids = batch()
    cm = gp.compile(build_llama(args.layers), gp.Plan([gp.LoRA(targets=LINEAR, r=8, alpha=16)]), (ids,),
                    {"use_cache": False})
    step = cm.compile_training("causal_lm", gp.optim.AdamW(lr=1e-4), example_batch=(ids,))
    folder = tempfile.mkdtemp(prefix="gp-onnx-step-")
    print(f"Llama hidden 256 x {args.layers} layers, LoRA r=8 all linear, AdamW, batch 4x128")
    if "ops" in parts:
        ab_ops(step, ids, folder, args.rounds)
    if "translate" in parts:
        tr = translate_pair(step, max(2, args.rounds // 3))
        print(f"ONNX translation: {tr['direct']:.2f} s; with rsub.Scalar left in (whole-graph re-decomposition) "
              f"{tr['re-decomposed']:.2f} s (x{tr['re-decomposed'] / tr['direct']:.2f})")
    if "load" in parts:
        path = os.path.join(folder, "train.onnx")
        step.export_onnx(path)
        OnnxTrainer(path)  # saves the optimized model
        load = _interleaved({"plain": lambda: OnnxTrainer(path, cache_optimized=False),
                             "cached": lambda: OnnxTrainer(path)}, args.rounds)
        print(f"OnnxTrainer load: optimizing {load['plain']:.2f} s, from the saved optimized model "
              f"{load['cached']:.2f} s (x{load['cached'] / load['plain']:.2f})")


def ab_ops(step: Any, ids: Any, folder: str, rounds: int) -> None:
    """Op counts and interleaved step time, exported without and with the ONNX-side rewrites."""
    from graphpeft.backends.onnx import OnnxTrainer

    paths = export_pair(step, folder)
    print("\nONNX ops, exported file / onnxruntime's optimized graph:")
    print("| ops | before | after |\n|---|---:|---:|")
    raw = {k: _kinds(p) for k, p in paths.items()}
    opt = {k: _optimized_kinds(p) for k, p in paths.items()}
    for op in ("Transpose", "ScatterND", "Pad", "Concat", "FusedMatMul", "MatMul", "Gemm"):
        print(f"| `{op}` | {raw['before'][op]} / {opt['before'][op]} | {raw['after'][op]} / {opt['after'][op]} |")
    print(f"| all | {sum(raw['before'].values())} / {int(sum(opt['before'].values()) - opt['before']['MiB'])} | "
          f"{sum(raw['after'].values())} / {int(sum(opt['after'].values()) - opt['after']['MiB'])} |")
    print(f"| stored tensors in onnxruntime's graph, MiB | {opt['before']['MiB']} | {opt['after']['MiB']} |")

    trainers = {k: OnnxTrainer(p, cache_optimized=False) for k, p in paths.items()}
    for t in trainers.values():
        t.step(ids)
    ms = _interleaved({k: (lambda t=t: t.step(ids)) for k, t in trainers.items()}, rounds)
    print(f"\nonnxruntime step, median of {rounds} interleaved: before {1000 * ms['before']:.1f} ms, "
          f"after {1000 * ms['after']:.1f} ms (x{ms['after'] / ms['before']:.2f})")


if __name__ == "__main__":
    main()
