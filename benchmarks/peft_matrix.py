"""PEFT's small-model matrix for graphpeft's methods: does a peft adapter import, compute the same,
merge the same, and export back?

    python -m benchmarks.peft_matrix            # the table, then the count
    python -m benchmarks.peft_matrix --json out.json

The cases follow peft's custom-model tests (``tests/test_custom_models.py``: an MLP, an Embedding
feeding transformers' ``Conv1D``, Conv1d, Conv2d, grouped Conv2d, Conv3d and
``nn.MultiheadAttention`` models with LoRA, DoRA, IA3, VeRA, RandLoRA, SHiRA and TrainableTokens
configs, and LoRA's ``target_parameters`` on the MLP), restricted to the methods and options graphpeft has.
The models are written here to the same shapes. For each case: peft builds the adapter with
non-identity weights and saves it; ``gp.import_peft`` compiles it; outputs are compared unmerged
and merged (a merge both refuse counts as agreeing); ``gp.export_peft`` writes it back and peft
loads it. A case passes when all agree within ``1e-5``.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import warnings
from typing import Any, Callable

import torch
import torch.nn as nn

ATOL = 1e-5


# -- the models (peft's custom-model shapes) -----------------------------------------------------


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(10, 20), nn.Linear(20, 2)

    def forward(self, x):
        return torch.log_softmax(self.lin1(torch.relu(self.lin0(x.float()))), -1)


class EmbConv1D(nn.Module):
    def __init__(self) -> None:
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.emb, self.conv1d, self.lin0 = nn.Embedding(100, 5), Conv1D(1, 5), nn.Linear(10, 2)

    def forward(self, x):
        return torch.log_softmax(self.lin0(torch.relu(self.conv1d(self.emb(x))).flatten(1)), -1)


class Conv1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1d, self.lin0 = nn.Conv1d(1, 1, 2), nn.Linear(9, 2)

    def forward(self, x):
        return torch.log_softmax(self.lin0(torch.relu(self.conv1d(x.float().reshape(-1, 1, 10))).flatten(1)), -1)


class Conv2d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv2d, self.lin0 = nn.Conv2d(5, 10, 3), nn.Linear(10, 2)

    def forward(self, x):
        return torch.log_softmax(self.lin0(torch.relu(self.conv2d(x.float().reshape(-1, 5, 3, 3))).flatten(1)), -1)


class Conv2dGroups(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.conv2d, self.lin1 = nn.Linear(90, 288), nn.Conv2d(16, 16, 3, groups=8), nn.Linear(16, 2)

    def forward(self, x):
        h = self.lin0(x.float().flatten()).reshape(2, 16, 3, 3)
        return torch.log_softmax(self.lin1(torch.relu(self.conv2d(h)).flatten(1)), -1)


class Conv2dGroups2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv2d, self.lin0 = nn.Conv2d(16, 32, 3, padding=1, groups=2), nn.Linear(12800, 2)

    def forward(self, x):
        h = torch.arange(9 * 16 * 20 * 20, dtype=torch.float).view(9, 16, 20, 20) + 0 * x.float().sum()
        return torch.log_softmax(self.lin0(torch.relu(self.conv2d(h)).flatten(1)), -1)


class Conv3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv3d, self.lin0 = nn.Conv3d(5, 10, 3), nn.Linear(10, 2)

    def forward(self, x):
        h = torch.stack([x.float()] * 3, -1).reshape(-1, 5, 3, 3, 3)
        return torch.log_softmax(self.lin0(torch.relu(self.conv3d(h)).flatten(1)), -1)


class MHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha, self.lin0 = nn.MultiheadAttention(10, 2), nn.Linear(10, 2)

    def forward(self, x):
        h = x.float()
        return torch.log_softmax(self.lin0(self.mha(h, h, h)[0]), -1)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "MLP": MLP, "EmbConv1D": EmbConv1D, "Conv1d": Conv1d, "Conv2d": Conv2d, "Conv2dGroups": Conv2dGroups,
    "Conv2dGroups2": Conv2dGroups2, "Conv3d": Conv3d, "MHA": MHA}


def _input(model: str) -> torch.Tensor:
    x = torch.arange(90).view(9, 10)  # peft's test input (token ids for EmbConv1D)
    return x.float().view(9, 1, 10) if model == "MHA" else x


# -- the cases: (name, model, peft config class name, options) ------------------------------------

LORA_NONID = {"init_lora_weights": False}


def _cases() -> list[tuple[str, str, str, dict[str, Any]]]:
    lora = [
        ("MLP 1", "MLP", {"target_modules": "lin0"}), ("MLP 2", "MLP", {"target_modules": ["lin0"]}),
        ("MLP 3", "MLP", {"target_modules": ["lin1"]}), ("MLP 4", "MLP", {"target_modules": ["lin0", "lin1"]}),
        ("MLP 5", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
        ("MLP 6", "MLP", {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1}),
        ("MLP 7 DoRA", "MLP", {"target_modules": ["lin0"], "use_dora": True}),
        ("MLP 8 DoRA", "MLP", {"target_modules": ["lin0", "lin1"], "use_dora": True}),
        ("MLP 9 DoRA", "MLP", {"target_modules": "lin1", "use_dora": True, "lora_alpha": 32}),
        ("EmbConv1D 1", "EmbConv1D", {"target_modules": ["conv1d"]}),
        ("EmbConv1D 2", "EmbConv1D", {"target_modules": ["emb"]}),
        ("EmbConv1D 3", "EmbConv1D", {"target_modules": ["emb", "conv1d"]}),
        ("EmbConv1D 1 DoRA", "EmbConv1D", {"target_modules": ["conv1d"], "use_dora": True}),
        ("EmbConv1D 2 DoRA", "EmbConv1D", {"target_modules": ["emb"], "use_dora": True}),
        ("EmbConv1D 3 DoRA", "EmbConv1D", {"target_modules": ["emb", "conv1d"], "use_dora": True}),
        ("EmbConv1D trainable_token_indices", "EmbConv1D",
         {"target_modules": ["conv1d"], "trainable_token_indices": {"emb": [0, 10]}}),
        ("Conv1d", "Conv1d", {"target_modules": ["conv1d"]}),
        ("Conv1d DoRA", "Conv1d", {"target_modules": ["conv1d"], "use_dora": True}),
        ("Conv2d 1", "Conv2d", {"target_modules": ["conv2d"]}),
        ("Conv2d 2", "Conv2d", {"target_modules": ["conv2d", "lin0"]}),
        ("Conv2d 1 DoRA", "Conv2d", {"target_modules": ["conv2d"], "use_dora": True}),
        ("Conv2d 2 DoRA", "Conv2d", {"target_modules": ["conv2d", "lin0"], "use_dora": True}),
        ("Conv2d groups", "Conv2dGroups", {"target_modules": ["conv2d"]}),
        ("Conv2d groups 2", "Conv2dGroups2", {"target_modules": ["conv2d"]}),
        ("Conv2d groups DoRA", "Conv2dGroups", {"target_modules": ["conv2d"], "use_dora": True}),
        ("Conv2d groups 2 DoRA", "Conv2dGroups2", {"target_modules": ["conv2d"], "use_dora": True}),
        ("Conv3d 1", "Conv3d", {"target_modules": ["conv3d"]}),
        ("Conv3d 2", "Conv3d", {"target_modules": ["conv3d", "lin0"]}),
        ("Conv3d 1 DoRA", "Conv3d", {"target_modules": ["conv3d"], "use_dora": True}),
        ("Conv3d 2 DoRA", "Conv3d", {"target_modules": ["conv3d", "lin0"], "use_dora": True}),
        ("MLP lora_bias", "MLP", {"target_modules": ["lin0", "lin1"], "lora_bias": True, "lora_alpha": 32}),
        ("Conv2d lora_bias", "Conv2d", {"target_modules": ["conv2d"], "lora_bias": True, "lora_alpha": 32}),
        ("Conv3d lora_bias", "Conv3d", {"target_modules": ["conv3d"], "lora_bias": True, "lora_alpha": 32}),
        ("MHA 1", "MHA", {"target_modules": ["mha"]}),
        ("MHA 2", "MHA", {"target_modules": ["mha", "lin0"]}),
        ("MLP target_parameters 1", "MLP", {"target_modules": [], "target_parameters": ["lin0.weight"]}),
        ("MLP target_parameters 2", "MLP", {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"]}),
    ]
    ia3 = [
        ("MLP 1", "MLP", {"target_modules": "lin0", "feedforward_modules": []}),
        ("MLP 2", "MLP", {"target_modules": "lin0", "feedforward_modules": "lin0"}),
        ("MLP 3", "MLP", {"target_modules": ["lin0"], "feedforward_modules": []}),
        ("MLP 4", "MLP", {"target_modules": ["lin0"], "feedforward_modules": ["lin0"]}),
        ("MLP 5", "MLP", {"target_modules": ["lin1"], "feedforward_modules": []}),
        ("MLP 6", "MLP", {"target_modules": ["lin1"], "feedforward_modules": ["lin1"]}),
        ("MLP 7", "MLP", {"target_modules": ["lin0", "lin1"], "feedforward_modules": []}),
        ("MLP 8", "MLP", {"target_modules": ["lin0", "lin1"], "feedforward_modules": ["lin0", "lin1"]}),
        ("MLP 9", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "feedforward_modules": ["lin0"]}),
        ("Conv1D 1", "EmbConv1D", {"target_modules": ["conv1d"], "feedforward_modules": ["conv1d"]}),
        ("Conv1D 2", "EmbConv1D", {"target_modules": ["conv1d", "lin0"], "feedforward_modules": ["conv1d", "lin0"]}),
        ("Conv1D 3", "EmbConv1D", {"target_modules": ["conv1d"], "feedforward_modules": ["conv1d"],
                                   "modules_to_save": ["lin0"]}),
        ("Conv2d 1", "Conv2d", {"target_modules": ["conv2d"], "feedforward_modules": []}),
        ("Conv2d 2", "Conv2d", {"target_modules": ["conv2d"], "feedforward_modules": ["conv2d"]}),
        ("Conv2d 3", "Conv2d", {"target_modules": ["conv2d", "lin0"], "feedforward_modules": []}),
        ("Conv2d 4", "Conv2d", {"target_modules": ["conv2d", "lin0"], "feedforward_modules": ["conv2d"]}),
        ("Conv2d 5", "Conv2d", {"target_modules": ["conv2d", "lin0"], "feedforward_modules": ["conv2d", "lin0"]}),
        ("Conv3d 1", "Conv3d", {"target_modules": ["conv3d"], "feedforward_modules": []}),
        ("Conv3d 2", "Conv3d", {"target_modules": ["conv3d"], "feedforward_modules": ["conv3d"]}),
        ("Conv3d 3", "Conv3d", {"target_modules": ["conv3d", "lin0"], "feedforward_modules": []}),
        ("Conv3d 4", "Conv3d", {"target_modules": ["conv3d", "lin0"], "feedforward_modules": ["conv3d"]}),
        ("Conv3d 5", "Conv3d", {"target_modules": ["conv3d", "lin0"], "feedforward_modules": ["conv3d", "lin0"]}),
    ]
    shira = [("MLP 1", "MLP", {"r": 1, "target_modules": "lin0"}), ("MLP 2", "MLP", {"r": 1, "target_modules": ["lin0"]}),
             ("MLP 3", "MLP", {"r": 1, "target_modules": ["lin1"]}),
             ("MLP 4", "MLP", {"r": 1, "target_modules": ["lin0", "lin1"], "random_seed": 56}),
             ("MLP 5", "MLP", {"r": 1, "target_modules": ["lin0"]})]
    vera = [("MLP 1", "MLP", {"target_modules": "lin0"}), ("MLP 2", "MLP", {"target_modules": ["lin0"]}),
            ("MLP 3", "MLP", {"target_modules": ["lin1"]}), ("MLP 4", "MLP", {"target_modules": ["lin0", "lin1"]}),
            ("MLP 5", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
            ("EmbConv1D 1", "EmbConv1D", {"target_modules": ["conv1d"]})]
    rand = [("MLP 1", "MLP", {"target_modules": "lin0"}), ("MLP 2", "MLP", {"target_modules": ["lin0"]}),
            ("MLP 3", "MLP", {"target_modules": ["lin1"]}), ("MLP 4", "MLP", {"target_modules": ["lin0", "lin1"]}),
            ("MLP 5", "MLP", {"target_modules": ["lin0", "lin1"], "sparse": True}),
            ("MLP 6", "MLP", {"target_modules": ["lin0", "lin1"], "very_sparse": True}),
            ("MLP 7", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]})]
    tokens = [("EmbConv1D 1", "EmbConv1D", {"target_modules": ["emb"], "token_indices": [0, 1, 3]})]
    out: list[tuple[str, str, str, dict[str, Any]]] = []
    for label, config, group in (("LoRA", "LoraConfig", lora), ("IA3", "IA3Config", ia3), ("SHiRA", "ShiraConfig", shira),
                                 ("VeRA", "VeraConfig", vera), ("RandLoRA", "RandLoraConfig", rand),
                                 ("TrainableTokens", "TrainableTokensConfig", tokens)):
        for name, model, options in group:
            out.append((f"{label} {name}", model, config, options))
    return out


_NON_IDENTITY = {"LoraConfig": {"init_lora_weights": False}, "IA3Config": {"init_ia3_weights": False},
                 "ShiraConfig": {"init_weights": False}, "VeraConfig": {"init_weights": False},
                 "RandLoraConfig": {"init_weights": False, "randlora_alpha": 1},
                 "TrainableTokensConfig": {"init_weights": False}}


def _randomize(pm: nn.Module) -> None:
    """Give every adapter tensor a non-identity value (peft leaves some zero even with its
    non-identity init: trainable tokens beside LoRA, lora_B's bias)."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad and ("token_adapter" in name or "lora_B" in name and name.endswith("bias")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out if isinstance(out, torch.Tensor) else next(iter(out.values())) if isinstance(out, dict) else out[0]


def run_case(model_name: str, config_name: str, options: dict[str, Any]) -> tuple[bool, str]:
    """One case: (passed, what differed or failed)."""
    import peft

    import graphpeft as gp

    torch.manual_seed(0)
    base = MODELS[model_name]().eval()
    x = _input(model_name)
    config = getattr(peft, config_name)(**{**_NON_IDENTITY[config_name], **options})
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), config).eval()
        _randomize(pm)
        pm.save_pretrained(d)
        try:
            cm = gp.import_peft(copy.deepcopy(base), d, (x,))
        except gp.GraphPeftError as e:
            return False, f"import: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        with torch.no_grad():
            want = _out(pm, x)
            unmerged = (_out(cm, x) - want).abs().max().item()
            if unmerged > ATOL:
                return False, f"unmerged differs by {unmerged:.2g}"
            merged_note = ""
            try:
                peft_merged = _out(copy.deepcopy(pm).merge_and_unload(), x)
            except (NotImplementedError, ValueError, RuntimeError) as e:
                peft_merged, merged_note = None, f"peft refuses to merge ({type(e).__name__})"
            try:
                ours = _out(cm.merge(), x)
            except gp.GraphPeftError:
                ours = None
            if (peft_merged is None) != (ours is None):
                return False, f"merge: peft {'refuses' if peft_merged is None else 'merges'}, graphpeft " \
                              f"{'refuses' if ours is None else 'merges'}"
            if ours is not None and (ours - peft_merged).abs().max().item() > ATOL:
                return False, f"merged differs by {(ours - peft_merged).abs().max().item():.2g}"
        with tempfile.TemporaryDirectory() as d2:
            try:
                gp.export_peft(cm, d2)
            except gp.GraphPeftError as e:
                return False, f"export: {str(e).splitlines()[0][:120]}"
            back = peft.PeftModel.from_pretrained(copy.deepcopy(base), d2).eval()
            with torch.no_grad():
                again = (_out(back, x) - want).abs().max().item()
            if again > ATOL:
                return False, f"exported folder in peft differs by {again:.2g}"
    return True, merged_note or f"unmerged {unmerged:.1g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    results = []
    for name, model, config, options in _cases():
        try:
            ok, note = run_case(model, config, options)
        except Exception as e:  # noqa: BLE001 - a case that crashes is a failed case, with its reason
            ok, note = False, f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        results.append({"case": name, "model": model, "passed": ok, "note": note})
        print(f"{'pass' if ok else 'FAIL'}  {name:40s} {note}", flush=True)
    passed = sum(r["passed"] for r in results)
    print(f"\n{passed} of {len(results)} cases pass ({100 * passed / len(results):.1f}%)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
