"""Data-parallel training steps (issue 15) with real gloo process groups on loopback.

Two ranks are spawned as subprocesses (this file run as a script; a file store in a temporary
folder, so no port is taken; a bounded timeout, so a hang fails instead of blocking), each
trains on half the batch; the parent trains one process on the whole batch and compares. The
halves hold the same number of loss elements, so the mean of the ranks' mean losses is the
whole batch's mean and the averaged gradient is the whole batch's gradient.
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
from graphpeft.errors import DistributedError
from graphpeft.graph import META_KEY

WORLD = 2
STEPS = 3
TIMEOUT_S = 120  # the whole two-process run; a deadlock fails the test instead of hanging CI


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)


def _compiled(x: torch.Tensor) -> gp.CompiledModel:
    return gp.compile(_model(), gp.Plan([gp.LoRA(targets=["0", "2"], r=2, init="random")]), (x,))


def _optimizer() -> gp.optim.AdamW:
    return gp.optim.AdamW(lr=1e-2, weight_decay=0.01)


def _params(step: gp.TrainingStep) -> dict[str, torch.Tensor]:
    """Trainable tensors and optimizer state (AdamW's update barely depends on the gradient's
    scale, its first moment is proportional to it: both are compared)."""
    state = step.state_dict()
    return {**state["params"], **{f"opt/{k}": v for k, v in state["optimizer"].items()}}


# --- the rank processes --------------------------------------------------------------------------


def _worker(rank: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    x, y = _batch()
    half = x.shape[0] // WORLD
    xs, ys = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
    cm = _compiled(xs)
    if rank:  # rank 1 starts elsewhere: the first step must take rank 0's adapters
        cm.load_adapter_state_dict({k: v + 1 for k, v in cm.adapter_state_dict().items()})
    step = cm.compile_training("mse", _optimizer(), data_parallel=True, bucket_cap_mb=1e-4)
    record: dict[str, Any] = {"losses": [], "params": []}
    for i in range(STEPS):
        record["losses"].append(step(xs, ys))
        record["params"].append(_params(step))
        if i == 1:
            step.save_checkpoint(os.path.join(out, f"ckpt_{rank}.safetensors"))
    bad = ys.clone()
    if rank == 1:  # a NaN on one rank only: every rank must skip the step
        bad[0, 0] = float("nan")
    step(xs, bad)
    record["skipped"] = step.skipped_steps
    record["after_skip"] = _params(step)
    report = step.communication_report()
    record["report"] = (report.gradient_bytes, report.full_finetune_bytes, len(report.buckets), report.world_size)
    record["sharded"] = _sharded_run(rank, xs, ys)
    record["mismatch"] = _different_bases(rank, xs, ys)
    torch.save(record, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _sharded_run(rank: int, xs: torch.Tensor, ys: torch.Tensor) -> dict[str, Any]:
    """The same training with frozen weights sharded (FSDP-style): what the graph stores, and
    the trained tensors after each step."""
    from graphpeft.graph import Role, get_tensor, roles

    cm = gp.compile(_model(), gp.Plan([gp.LoRA(targets=["0", "2"], r=2, init="random")]), (xs,))  # model dropped
    step = cm.compile_training("mse", _optimizer(), data_parallel=True, bucket_cap_mb=1e-4, shard_frozen=True)
    held_before = step.frozen_bytes_held()
    gm = step.distributed_graph_module  # built here: the shards stored, the whole weights released
    stored = {n: tuple(get_tensor(gm, n).shape) for n, r in roles(gm).items() if r == Role.FROZEN}
    params = []
    for _ in range(STEPS):
        step(xs, ys)
        params.append(_params(step))
    report = step.communication_report()
    refused = {}
    for name, call in (("forward", lambda: cm(xs)), ("new_shape", lambda: step(xs[:1], ys[:1]))):
        try:
            call()
        except gp.WeightsError as e:
            refused[name] = str(e)
    return {"stored": stored, "params": params, "shard_bytes": report.frozen_shard_bytes,
            "gathers": sum("all_gather" in str(n.target) for n in gm.graph.nodes),
            "held": (held_before, step.frozen_bytes_held()), "released": report.released_bytes,
            "meta": sorted(cm.meta_tensors()), "refused": refused}


def _different_bases(rank: int, xs: torch.Tensor, ys: torch.Tensor) -> str:
    """Rank 1's base differs: the first step must refuse on every rank."""
    from graphpeft.graph import get_tensor

    cm = _compiled(xs)
    if rank:
        with torch.no_grad():
            get_tensor(cm.graph_module, "0.weight").add_(1.0)
    step = cm.compile_training("mse", _optimizer(), data_parallel=True)
    try:
        step(xs, ys)
    except DistributedError as e:
        return str(e)
    return ""


def _spawn(out: str) -> list[subprocess.Popen]:
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    return [subprocess.Popen([sys.executable, __file__, str(r), out], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for r in range(WORLD)]


def _join(procs: list[subprocess.Popen]) -> None:
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-3000:]}"


# --- tests ------------------------------------------------------------------------------------------


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in b)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: Any) -> dict[str, Any]:
    """One two-rank run shared by the tests below, and one process on the whole batch, trained
    here while the ranks run."""
    out = str(tmp_path_factory.mktemp("ranks"))
    procs = _spawn(out)
    try:
        x, y = _batch()
        cm = _compiled(x[: x.shape[0] // WORLD])
        step = cm.compile_training("mse", _optimizer())
        losses, params = [], []
        for _ in range(STEPS):
            losses.append(step(x, y))
            params.append(_params(step))
    finally:
        _join(procs)
    ranks = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(WORLD)]
    return {"out": out, "ranks": ranks, "step": step, "losses": losses, "params": params, "batch": (x, y)}


def test_two_gloo_ranks_match_one_process_on_the_whole_batch(two_ranks: dict[str, Any]) -> None:
    out, (r0, r1), step = two_ranks["out"], two_ranks["ranks"], two_ranks["step"]
    losses, params, (x, y) = two_ranks["losses"], two_ranks["params"], two_ranks["batch"]
    for i in range(STEPS):  # ranks bit-identical, and the whole batch's step to 1e-5
        assert all(torch.equal(r0["params"][i][k], r1["params"][i][k]) for k in r0["params"][i])
        assert torch.equal(r0["losses"][i], r1["losses"][i])
        assert _rel(r0["params"][i], params[i]) < 1e-5
        assert abs(float(r0["losses"][i] - losses[i])) <= 1e-5 * abs(float(losses[i]))
    # a NaN on rank 1 only: both ranks skipped, tensors unchanged and still identical
    assert r0["skipped"] == r1["skipped"] == 1
    assert all(torch.equal(r0["after_skip"][k], r0["params"][-1][k]) for k in r0["after_skip"])
    assert all(torch.equal(r0["after_skip"][k], r1["after_skip"][k]) for k in r0["after_skip"])
    # only rank 0 wrote its checkpoint; one process resumes from it (another world size)
    assert os.path.exists(os.path.join(out, "ckpt_0.safetensors"))
    assert not os.path.exists(os.path.join(out, "ckpt_1.safetensors"))
    step.load_checkpoint(os.path.join(out, "ckpt_0.safetensors"))
    step(x, y)
    assert _rel(_params(step), r0["params"][2]) < 1e-5
    # adapters only: the gradient bytes are the trainable tensors', against the base weights'
    grad_bytes, full_bytes, buckets, world = r0["report"]
    assert grad_bytes == sum(v.numel() * v.element_size() for k, v in params[0].items() if not k.startswith("opt/"))
    assert full_bytes == sum(p.numel() * p.element_size() for p in _model().parameters())
    assert buckets > 1 and world == WORLD
    # different frozen weights on the ranks: both refuse, naming the tensor
    assert all("0.weight" in r["mismatch"] and "different frozen weights" in r["mismatch"] for r in (r0, r1))


def test_sharded_frozen_weights_store_half_and_train_the_same(two_ranks: dict[str, Any]) -> None:
    """FSDP-style: each of the 2 ranks stores half of every frozen weight (padded: the biases
    have odd sizes), all-gathers it before use, trains bit for bit like the unsharded step, and
    holds only its shards (the whole weights released as they are sharded: 1/world per rank)."""
    ranks = two_ranks["ranks"]
    whole = {n: p.numel() for n, p in _model().named_parameters()}
    for r in ranks:
        sharded = r["sharded"]
        assert {n[:-len("_shard")]: shape for n, shape in sharded["stored"].items()} == \
            {n: (-(-numel // WORLD),) for n, numel in whole.items()}
        assert sharded["shard_bytes"] == 4 * sum(-(-numel // WORLD) for numel in whole.values())
        assert sharded["gathers"] >= len(whole)  # forward uses, and the backward's re-gathers
        # once sharded the whole weights are released: the process holds its shards only
        before, after = sharded["held"]
        assert before == 4 * sum(whole.values())
        assert after == sharded["shard_bytes"] and sharded["released"] == 4 * sum(whole.values())
        assert sharded["meta"] == sorted(whole)
        assert "released by a sharded" in sharded["refused"]["forward"]
        assert "new_shape" not in sharded["refused"]  # another batch shape trains on the same shards
        for i in range(STEPS):
            assert all(torch.equal(sharded["params"][i][k], r["params"][i][k]) for k in r["params"][i])


def test_data_parallel_without_a_process_group_raises() -> None:
    import torch.distributed as dist

    assert not dist.is_initialized()
    x, _ = _batch()
    with pytest.raises(DistributedError, match="init_process_group"):
        _compiled(x).compile_training("mse", _optimizer(), data_parallel=True)


@pytest.fixture
def world_of_one(tmp_path: Any) -> Any:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1,
                            timeout=timedelta(seconds=30))
    try:
        yield
    finally:
        dist.destroy_process_group()


def _collectives(gm: torch.fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op == "call_function" and "c10d" in str(n.target)]


def test_export_of_a_data_parallel_step_is_single_device(world_of_one: Any, tmp_path: Any) -> None:
    import onnx

    from graphpeft.backends.onnx import OnnxTrainer

    x, y = _batch()
    cm = _compiled(x)
    step = cm.compile_training("mse", _optimizer(), data_parallel=True, clip_grad_norm=1.0)
    assert _collectives(step.distributed_graph_module)  # what runs
    assert not _collectives(step.graph_module)  # what exports and reports see
    prov = [n.meta[META_KEY] for n in step.distributed_graph_module.graph.nodes
            if n.name in _collectives(step.distributed_graph_module)]
    assert all(p["pass_name"] == "allreduce_gradients" and p["part"] == "communicate" for p in prov)
    loss = step(x, y)
    step.export_onnx(tmp_path / "step.onnx")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "step.onnx")).graph.node}
    assert not {o for o in ops if "reduce" in o.lower() and "all" in o.lower()}
    trainer = OnnxTrainer(tmp_path / "step.onnx")
    assert torch.isfinite(torch.as_tensor(trainer.step(x, y)))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("options", [dict(accumulation_steps=2, clip_grad_norm=0.5, fuse_optimizer=False),
                                     dict(fuse_optimizer=True), dict(shard_frozen=True, clip_grad_norm=1.0), dict(shard_frozen="keep")],
                         ids=["accumulate_clip_per_tensor", "fused", "sharded_frozen", "sharded_frozen_kept"])
def test_a_world_of_one_trains_exactly_like_the_plain_step(world_of_one: Any, options: dict) -> None:
    """Sum over one rank and division by 1 are exact: the rewritten graph (collectives, new
    order, consumers rewired) must give the plain step's numbers bit for bit."""
    x, y = _batch()
    results = []
    for dp in (False, True):
        opts = options if dp else {k: v for k, v in options.items() if k != "shard_frozen"}
        step = _compiled(x).compile_training("mse", _optimizer(), data_parallel=dp, bucket_cap_mb=1e-4, **opts)
        losses = [step(x, y) for _ in range(2)]
        results.append((losses, _params(step)))
    (plain_losses, plain), (dp_losses, dp) = results
    assert all(torch.equal(a, b) for a, b in zip(plain_losses, dp_losses))
    assert all(torch.equal(plain[k], dp[k]) for k in plain)


def test_sharding_frees_each_whole_weight_at_its_release(world_of_one: Any) -> None:
    """The compile leaves reference cycles (graph copies sharing the weights) behind: building
    the sharded graph collects them first, so each whole weight is freed as its shard is stored
    (not when the cyclic collector next runs), and the shards never pile up on the weights."""
    import gc
    import weakref

    from graphpeft.graph import get_tensor

    x, y = _batch()
    cm = _compiled(x)
    gc.disable()  # as between two automatic collections
    try:
        step = cm.compile_training("mse", _optimizer(), data_parallel=True, shard_frozen=True)
        whole = weakref.ref(get_tensor(cm.graph_module, "0.weight"))
        step.distributed_graph_module  # noqa: B018 - builds the sharded graph, releases the weights
        assert whole() is None
    finally:
        gc.enable()


def test_collectives_are_bucketed_and_overlap_the_backward(world_of_one: Any) -> None:
    from graphpeft.training import phase_of

    x, y = _batch()
    step = _compiled(x).compile_training("mse", _optimizer(), data_parallel=True, bucket_cap_mb=1e-4)
    nodes = list(step.distributed_graph_module.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    issues = [n for n in nodes if "all_reduce" in str(n.target)]
    waits = [n for n in nodes if "wait_tensor" in str(n.target)]
    last_backward = max(pos[n] for n in nodes if n.op == "call_function" and phase_of(n) == "backward")
    report = step.communication_report()
    assert len(issues) == len(report.buckets) + 1  # the gradient buckets and the loss
    assert sum(n for n, _ in report.buckets) == len(step.param_names) == len(waits) - 1
    assert all(b <= 1e-4 * (1 << 20) or n == 1 for n, b in report.buckets)  # the cap holds
    assert sum(pos[n] < last_backward for n in issues) >= 2  # issued while the backward still runs
    assert all(pos[w] > last_backward for w in waits)  # waited for only when the update needs it
    assert "1 ranks" in str(report) and report.fraction_of_full_finetune < 1


def test_bad_data_parallel_options_raise() -> None:
    x, _ = _batch()
    with pytest.raises(gp.PlanError, match="bucket_cap_mb"):
        _compiled(x).compile_training("mse", _optimizer(), data_parallel=True, bucket_cap_mb=0)
    with pytest.raises(gp.PlanError, match="data_parallel"):
        _compiled(x).compile_training("mse", _optimizer(), data_parallel="yes")
    with pytest.raises(gp.PlanError, match="data_parallel=True"):
        _compiled(x).compile_training("mse", _optimizer(), shard_frozen=True)
    with pytest.raises(gp.PlanError, match="'keep'"):
        _compiled(x).compile_training("mse", _optimizer(), data_parallel=True, shard_frozen="yes")


def test_the_rules_decline_with_a_reason() -> None:
    from graphpeft.passes.training.allreduce_gradients import check_gradient
    from graphpeft.passes.training.shard_frozen_weights import check_shardable, shard_of

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    assert "placeholder" in check_gradient(x)
    assert "not floating point" in check_shardable(torch.zeros(4, dtype=torch.int8))
    assert "meta" in check_shardable(torch.zeros(4, device="meta"))
    assert check_shardable(torch.zeros(4)) is None
    w = torch.arange(5.0)  # 5 elements on 2 ranks: padded to 6, 3 each
    assert torch.equal(torch.cat([shard_of(w, r, 2) for r in range(2)])[:5], w)
    assert shard_of(w, 1, 2).tolist() == [3.0, 4.0, 0.0]


if __name__ == "__main__":  # one rank of the two-process test
    _worker(int(sys.argv[1]), sys.argv[2])
