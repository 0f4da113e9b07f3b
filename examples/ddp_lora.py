"""Data-parallel LoRA training of a small Llama on torch.distributed (gloo on CPU, loopback).

    torchrun --nproc_per_node=2 examples/ddp_lora.py            # MASTER_ADDR defaults to 127.0.0.1
    torchrun --nproc_per_node=2 examples/ddp_lora.py --steps 20 --out ddp_out
    python examples/ddp_lora.py --resume --out ddp_out          # one process resumes the 2-rank run

Every rank builds the same model (same seed), compiles the same LoRA plan and a training step
with ``data_parallel=True``, and trains on its own slice of each global batch. The step graph
all-reduces only the adapters' gradients (and the loss), so the ranks stay identical and each
step equals one process on the whole batch. Rank 0 prints the global mean loss per step and the
communication per step, and writes the checkpoint (adapters + optimizer state); a run of any
world size (one process included) resumes from it with ``--resume``.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import graphpeft as gp

VOCAB, CYCLE = 128, 16


def build_model(seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)  # the same base weights on every rank (graphpeft checks it)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def global_batch(step: int, batch: int, seq: int) -> torch.Tensor:
    """A batch of the task (continue a fixed cycle of tokens), the same on every rank."""
    g = torch.Generator().manual_seed(1000 + step)
    starts = torch.randint(0, CYCLE, (batch, 1), generator=g)
    return (starts + torch.arange(seq)) % CYCLE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8, help="global batch (split evenly across ranks)")
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--out", default="ddp_out")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    args = parser.parse_args()

    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500"), ("RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)  # plain `python examples/ddp_lora.py`: one process on loopback
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be divisible by the {world} ranks")
    per_rank = args.batch // world

    example = global_batch(0, args.batch, args.seq)[:per_rank]
    plan = gp.Plan([gp.LoRA(targets=["q_proj", "v_proj", "o_proj"], r=8, alpha=16)])
    cm = gp.compile(build_model(seed=0), plan, (example,), {"use_cache": False})
    step = cm.compile_training("causal_lm", gp.optim.AdamW(lr=args.lr), data_parallel=True)
    checkpoint = os.path.join(args.out, "checkpoint.safetensors")
    if args.resume:
        step.load_checkpoint(checkpoint)  # the state is replicated: every rank loads the same file
    if rank == 0:
        print(step.communication_report())
    for i in range(args.steps):
        ids = global_batch(i, args.batch, args.seq)[rank * per_rank:(rank + 1) * per_rank]
        loss = step(ids)  # this rank's slice; the returned loss is the global mean
        if rank == 0:
            print(f"step {i + 1:3d}  loss {float(loss):.4f}")
    os.makedirs(args.out, exist_ok=True)
    step.save_checkpoint(checkpoint)  # rank 0 writes; every rank returns once the file is complete
    if rank == 0:
        print(f"{world} ranks; checkpoint (adapters + optimizer state) written to {checkpoint}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
