"""Data-parallel LoRA step: 2 gloo processes against 1 process, on this machine.

    python -m benchmarks.distributed            # benchmark Llama (hidden 256, 4 layers), global batch 4 x 128
    python -m benchmarks.distributed --quick    # 2 layers, 4 x 64, fewer steps
    python -m benchmarks.distributed --memory   # per-process memory: whole vs sharded frozen weights

Every configuration trains the same global batch per step with LoRA r=8 on all linear layers
and AdamW, each in fresh processes run one configuration at a time:

* ``1 proc, N threads`` — the plain compiled step on the whole batch, torch using every core;
* ``1 proc, 1 thread`` — the same with one thread (what each rank gets below);
* ``1 proc, data_parallel`` — a world of one: the step with its collectives (their overhead);
* ``2 procs, data_parallel`` — two gloo ranks on loopback, half the batch each, one thread each.

``--memory`` measures per-process memory instead (issue 15 item 3): 2 gloo processes train a
bigger Llama (hidden 1024, 8 layers, vocab 8192: 0.47 GB of fp32 weights; quick: 4 layers) with
LoRA r=8 on q/v, once with whole frozen weights on every rank, once with ``shard_frozen=True``
(each rank keeps half of every frozen weight; the whole ones are released as the sharded graph is
built), and once compiled on meta with each rank reading only its shards from a safetensors file
(``step.load_base_weights``; its first step traces and builds the sharded graph).
Per rank: the peak RSS (VmHWM) of building, compiling and sharding, then of the first step, then
of steps 2-3 (the mark reset with ``/proc/self/clear_refs`` in between), RSS at the end, and the
frozen bytes the step holds (``step.frozen_bytes_held()``). Workers run with glibc's
``MALLOC_MMAP_THRESHOLD_=65536`` so released tensors go back to the OS at once. Memory figures are
per process and hold on a loaded machine. Writes ``benchmarks/results/distributed_memory.json``.

Reported: median step time (per rank; ranks are in lock-step), global samples per second, the
ratio to one process, and what one step all-reduces. On a 2-core machine the two ranks share
the same cores a single process would use, so the figure shows the collectives' cost and
overlap, not a scaling result. Writes ``benchmarks/results/distributed.json`` atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from typing import Any

import torch

RESULTS = os.path.join(os.path.dirname(__file__), "results", "distributed.json")
MEMORY_RESULTS = os.path.join(os.path.dirname(__file__), "results", "distributed_memory.json")


def _worker(cfg: dict[str, Any]) -> None:
    """One process of one configuration: compile, warm up, time; rank 0 writes its figures."""
    import torch.distributed as dist

    import graphpeft as gp

    from .cases import llama_case

    torch.set_num_threads(cfg["threads"])
    rank, world = cfg["rank"], cfg["world"]
    if cfg["data_parallel"]:
        dist.init_process_group("gloo", init_method=f"file://{cfg['store']}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=600))
    case = llama_case(quick=cfg["quick"])
    ids = case.batch[0]
    per_rank = ids.shape[0] // world
    local = ids[rank * per_rank:(rank + 1) * per_rank]
    t0 = time.perf_counter()
    cm = gp.compile(case.build().eval(), gp.Plan([gp.LoRA(targets=case.targets, r=8, alpha=16)]), (local,),
                    dict(case.kwargs))
    step = cm.compile_training("causal_lm", gp.optim.AdamW(lr=1e-3), data_parallel=cfg["data_parallel"])
    for _ in range(2):  # warm-up (the first call also builds the data-parallel graph)
        step(local)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(cfg["steps"]):
        if cfg["data_parallel"]:
            dist.barrier()
        start = time.perf_counter()
        step(local)
        times.append(time.perf_counter() - start)
    if rank == 0:
        out = {"median_ms": statistics.median(times) * 1000, "times_ms": [t * 1000 for t in times],
               "compile_and_warmup_s": compile_s}
        if cfg["data_parallel"]:
            report = step.communication_report()
            out["communication"] = {"bytes_per_step": report.bytes_per_step, "buckets": len(report.buckets),
                                    "full_finetune_bytes": report.full_finetune_bytes}
        with open(cfg["out"], "w", encoding="utf-8") as f:
            json.dump(out, f)
    if cfg["data_parallel"]:
        dist.destroy_process_group()


def _memory_model(quick: bool) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4 if quick else 8,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)
    torch.manual_seed(0)  # the same base on every rank
    return LlamaForCausalLM(cfg).eval()


def _memory_worker(cfg: dict[str, Any]) -> None:
    """One rank of a memory configuration: build, compile (the nn.Module dropped: the compiled
    model holds the weights), 3 steps; writes this rank's figures."""
    import gc

    import torch.distributed as dist

    import graphpeft as gp

    from .memory import reset_peak, status_mb

    torch.set_num_threads(1)
    rank, world = cfg["rank"], cfg["world"]
    dist.init_process_group("gloo", init_method=f"file://{cfg['store']}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=900))
    load = cfg["shard"] == "load"  # compiled on meta, then each rank reads only its shards
    if load:
        from accelerate import init_empty_weights

        with init_empty_weights():
            model = _memory_model(cfg["quick"])
    else:
        model = _memory_model(cfg["quick"])
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, 8192, (1, 64), generator=torch.Generator().manual_seed(rank))
    cm = gp.compile(model, gp.Plan([gp.LoRA(targets=["q_proj", "v_proj"], r=8, alpha=16)]), (ids,),
                    {"use_cache": False})
    del model
    gc.collect()
    step = cm.compile_training("causal_lm", gp.optim.AdamW(lr=1e-4), data_parallel=True,
                               shard_frozen=True if load else cfg["shard"])
    if load:
        step.load_base_weights(cfg["checkpoint"])
    held_before = step.frozen_bytes_held()
    compile_peak = status_mb("VmHWM")  # model and compile (and load), before the graph with collectives
    if not load:  # loaded: the first step traces for real tensors and builds it
        step.distributed_graph_module  # noqa: B018 - builds the graph with collectives (and shards)
    gc.collect()
    build_peak, build_rss = status_mb("VmHWM"), status_mb("VmRSS")  # model, compile, sharding
    reset_peak()
    losses = [float(step(ids))]
    gc.collect()
    first_peak = status_mb("VmHWM")
    process_peak = max(build_peak, first_peak)
    reset_peak()
    for _ in range(2):
        losses.append(float(step(ids)))
    out = {"rank": rank, "weight_bytes": weight_bytes, "held_before_first_step": held_before,
           "held_after": step.frozen_bytes_held(), "process_peak_mb": process_peak, "build_peak_mb": build_peak, "compile_peak_mb": compile_peak,
           "build_rss_mb": build_rss, "first_step_peak_mb": first_peak,
           "steps_peak_mb": status_mb("VmHWM"), "rss_end_mb": status_mb("VmRSS"), "losses": losses}
    with open(cfg["out"] + f".{rank}", "w", encoding="utf-8") as f:
        json.dump(out, f)
    dist.destroy_process_group()


def _run(name: str, world: int, threads: int, data_parallel: bool, quick: bool, steps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS=str(threads))
        procs = []
        for rank in range(world):
            cfg = {"rank": rank, "world": world, "threads": threads, "data_parallel": data_parallel, "quick": quick,
                   "steps": steps, "store": os.path.join(tmp, "store"), "out": out}
            procs.append(subprocess.Popen([sys.executable, "-m", "benchmarks.distributed", "--worker", json.dumps(cfg)],
                                          env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        for p in procs:
            if p.wait(timeout=1800) != 0:
                raise SystemExit(f"{name}: a process failed (exit {p.returncode})")
        with open(out, encoding="utf-8") as f:
            result = json.load(f)
    result.update(name=name, processes=world, threads_per_process=threads, data_parallel=data_parallel)
    print(f"  {name}: {result['median_ms']:.1f} ms per step", flush=True)
    return result


def _run_memory(name: str, shard: Any, quick: bool) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = os.path.join(tmp, "model.safetensors")
        if shard == "load":  # the same random base the other configurations build (seed 0)
            from safetensors.torch import save_model

            save_model(_memory_model(quick), checkpoint)
        out = os.path.join(tmp, "rank")
        env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
        cwd = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.distributed", "--memory-worker",
                                   json.dumps({"rank": r, "world": 2, "shard": shard, "quick": quick, "checkpoint": checkpoint,
                                               "store": os.path.join(tmp, "store"), "out": out})], env=env, cwd=cwd)
                 for r in range(2)]
        for p in procs:
            if p.wait(timeout=3600) != 0:
                raise SystemExit(f"{name}: a process failed (exit {p.returncode})")
        rows = []
        for r in range(2):
            with open(f"{out}.{r}", encoding="utf-8") as f:
                rows.append(dict(json.load(f), name=name))
    return rows


def memory_main(quick: bool) -> None:
    """Per-process memory of 2 gloo ranks, whole frozen weights against ``shard_frozen=True``."""
    print(f"data-parallel memory, 2 gloo processes ({'quick' if quick else 'full'}):", flush=True)
    rows = [*_run_memory("whole frozen weights", False, quick), *_run_memory("shard_frozen=True", True, quick),
            *_run_memory("shard_frozen=True, meta compile + step.load_base_weights", "load", quick)]
    mib = 1 / 2**20
    print("\n| configuration | rank | frozen MiB held | peak MiB: model + compile (+ load) | + graph with collectives "
          "| first step | steps 2-3 | process peak | RSS at end MiB |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['rank']} | {r['held_after'] * mib:.1f} of {r['weight_bytes'] * mib:.1f} | "
              f"{r['compile_peak_mb']:.0f} | {r['build_peak_mb']:.0f} | {r['first_step_peak_mb']:.0f} | "
              f"{r['steps_peak_mb']:.0f} | {r['process_peak_mb']:.0f} | {r['rss_end_mb']:.0f} |")
    same = [[a["losses"] == b["losses"] for a, b in zip(rows[:2], other)] for other in (rows[2:4], rows[4:])]
    print(f"losses == whole, per rank (sharded, loaded as shards): {same}")
    from graphpeft.paths import atomic_write

    os.makedirs(os.path.dirname(MEMORY_RESULTS), exist_ok=True)
    atomic_write(MEMORY_RESULTS, json.dumps({"quick": quick, "torch": torch.__version__, "rows": rows,
                                             "load_average": os.getloadavg()}, indent=1).encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 10, quick 5)")
    parser.add_argument("--memory", action="store_true", help="per-process memory: whole vs sharded frozen weights")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(json.loads(args.worker))
        return
    if args.memory_worker:
        _memory_worker(json.loads(args.memory_worker))
        return
    if args.memory:
        memory_main(args.quick)
        return
    steps = args.steps or (5 if args.quick else 10)
    cores = os.cpu_count() or 1
    configs = [(f"1 proc, {cores} threads", 1, cores, False), ("1 proc, 1 thread", 1, 1, False),
               ("1 proc, data_parallel", 1, cores, True), ("2 procs, data_parallel", 2, 1, True)]
    print(f"data-parallel LoRA step on {cores} cores ({'quick' if args.quick else 'full'}):", flush=True)
    rows = [_run(name, world, threads, dp, args.quick, steps) for name, world, threads, dp in configs]
    base, base_1t = rows[0]["median_ms"], rows[1]["median_ms"]
    batch = 4
    print(f"\n| configuration | step ms (median) | samples/s | vs {rows[0]['name']} | vs 1 proc, 1 thread |\n"
          "|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['median_ms']:.1f} | {batch / r['median_ms'] * 1000:.1f} | "
              f"{r['median_ms'] / base:.2f}x | {r['median_ms'] / base_1t:.2f}x |")
    comm = rows[-1].get("communication", {})
    if comm:
        print(f"\nall-reduced per step: {comm['bytes_per_step'] / 2**20:.3f} MiB in {comm['buckets']} bucket(s); "
              f"full fine-tuning would all-reduce {comm['full_finetune_bytes'] / 2**20:.1f} MiB")
    print(f"(the 2 ranks share the machine's {cores} cores: this measures the collectives' cost, not scaling; "
          "figures taken while other work loads the machine are not comparable)")
    from graphpeft.paths import atomic_write

    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    payload = {"cores": cores, "quick": args.quick, "steps": steps, "torch": torch.__version__, "rows": rows,
               "load_average": os.getloadavg()}
    atomic_write(RESULTS, json.dumps(payload, indent=1).encode())


if __name__ == "__main__":
    main()
