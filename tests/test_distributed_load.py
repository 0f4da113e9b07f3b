"""A sharded data-parallel step loads only its ranks' shards (issue 15): compiled on meta, then
``step.load_base_weights(folder)`` on a ``shard_frozen=True`` step reads each frozen weight as
this rank's ``1/world`` slice, so a whole weight never exists on a rank.

Two gloo ranks are spawned as subprocesses (this file run as a script; a file store, loopback
only, a bounded timeout). Each rank trains the same model twice from one safetensors file:
loading whole then sharding (the reference), and loading its shards only; the steps must agree
bit for bit, and the rank must hold ``1/world`` of the frozen bytes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from typing import Any

import pytest
import torch

import graphpeft as gp
from test_distributed import _join

WORLD = 2
STEPS = 3
TIMEOUT_S = 120  # the whole two-process run; a deadlock fails the test instead of hanging CI


def _model() -> torch.nn.Module:
    # 8 x 3 = 24 elements in rows of 8: each rank's 12 start or end mid-row; 3 biases: padded
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()


def _batch(rank: int, rows: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    return torch.randn(rows, 6, generator=g), torch.randn(rows, 3, generator=g)


def _step(rank: int) -> gp.TrainingStep:
    """Compiled on meta: no weight exists; LoRA initializes from the weight's shape, DoRA's
    magnitude reads the weight's values."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = _model()
    plan = gp.Plan([gp.LoRA(targets=["0"], r=2), gp.DoRA(targets=["2"], r=2)])
    cm = gp.compile(model, plan, (_batch(rank)[0].to("meta"),))
    return cm.compile_training("mse", gp.optim.AdamW(lr=1e-2), data_parallel=True, shard_frozen=True,
                               example_batch=_batch(rank))


def _run(rank: int, folder: str, shards: bool) -> dict[str, Any]:
    """Load (whole, or this rank's shards), train; what the rank held and did."""
    from graphpeft import weights

    step = _step(rank)
    if shards:  # a header that does not fit: refused before any shard is read, nothing loaded
        try:
            step.load_base_weights(os.path.join(folder, "bad.safetensors"))
        except gp.WeightsError as e:
            refused = (str(e), step.frozen_bytes_held(), len(step.cm.meta_tensors()))
    whole_reads: list[str] = []
    read = weights._read
    weights._read = lambda file, key: whole_reads.append(key) or read(file, key)
    try:
        path = os.path.join(folder, "model.safetensors")
        report = step.load_base_weights(path) if shards else step.cm.load_base_weights(path)
    finally:
        weights._read = read
    held_after_load = step.frozen_bytes_held()
    losses, params = [], []
    for _ in range(STEPS):
        losses.append(step(*_batch(rank)))
        state = step.state_dict()
        params.append({**state["params"], **{f"opt/{k}": v for k, v in state["optimizer"].items()}})
    record = {"losses": losses, "params": params, "held_after_load": held_after_load,
              "held": step.frozen_bytes_held(), "report": str(report), "whole_reads": whole_reads,
              "shards": sorted(report.shards), "sharded": step.communication_report().frozen_sharded}
    if shards:
        record["refused"] = refused
        record["other_shape"] = float(step(*_batch(rank, rows=2)))  # a new batch shape shares the shards
    return record


def _worker(rank: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=90))
    record = {"whole": _run(rank, out, False), "shards": _run(rank, out, True)}
    torch.save(record, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: Any) -> dict[str, Any]:
    from safetensors.torch import save_file, save_model

    out = tmp_path_factory.mktemp("ranks")
    torch.manual_seed(0)
    model = _model()
    save_model(model, str(out / "model.safetensors"))
    bad = {k: v.contiguous() for k, v in model.state_dict().items()}
    bad["0.weight"] = torch.zeros(8, 5)
    save_file(bad, str(out / "bad.safetensors"))
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, __file__, str(r), str(out)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(WORLD)]
    _join(procs)
    frozen = {n: p.numel() for n, p in model.named_parameters()}
    return {"ranks": [torch.load(out / f"rank{r}.pt") for r in range(WORLD)], "frozen": frozen}


def test_shard_load_trains_bit_for_bit_like_whole_load_then_shard(ranks: dict[str, Any]) -> None:
    for r in ranks["ranks"]:
        whole, shards = r["whole"], r["shards"]
        assert shards["sharded"] == whole["sharded"] and shards["sharded"]
        for i in range(STEPS):
            assert torch.equal(whole["losses"][i], shards["losses"][i])
            assert all(torch.equal(whole["params"][i][k], shards["params"][i][k]) for k in whole["params"][i])
        assert torch.isfinite(torch.tensor(shards["other_shape"]))  # a new batch shape reuses the shards
    r0, r1 = ranks["ranks"]
    assert all(torch.equal(r0["shards"]["params"][-1][k], v) for k, v in r1["shards"]["params"][-1].items())


def test_a_rank_reads_and_holds_only_its_shards(ranks: dict[str, Any]) -> None:
    frozen = ranks["frozen"]
    shard_bytes = 4 * sum(-(-n // WORLD) for n in frozen.values())
    for r in ranks["ranks"]:
        whole, shards = r["whole"], r["shards"]
        assert whole["held_after_load"] == 4 * sum(frozen.values())  # whole until the first step shards it
        assert shards["held_after_load"] == shards["held"] == whole["held"] == shard_bytes  # 1/world, padded
        assert shards["shards"] == sorted(frozen)
        assert "read as this rank's shards only" in shards["report"]
        # only DoRA's weight was read whole (its magnitude is the weight's norm); LoRA's were not
        assert shards["whole_reads"] == ["2.weight"]
        assert len(whole["whole_reads"]) == len(frozen)


def test_a_bad_header_refuses_before_anything_is_read(ranks: dict[str, Any]) -> None:
    for r in ranks["ranks"]:
        message, held, meta = r["shards"]["refused"]
        assert "0.weight (in bad.safetensors) has shape [8, 5]" in message and "nothing was loaded" in message
        assert held == 0 and meta >= len(ranks["frozen"])


if __name__ == "__main__":  # one rank of the two-process test
    _worker(int(sys.argv[1]), sys.argv[2])
