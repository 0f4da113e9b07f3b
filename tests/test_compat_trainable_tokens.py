"""PEFT's trainable tokens (issue 14): chosen rows of an embedding train, standalone
(``TrainableTokensConfig``) or beside a LoRA (``trainable_token_indices``); a tied output head
gets the same rows. ``peft`` is the oracle: outputs, merge, folders both ways; then ONNX and a
training step that changes only those rows."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn as nn

import graphpeft as gp

ROWS = [1, 3, 5]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.lin = nn.Linear(6, 4)

    def forward(self, ids):
        return self.lin(self.emb(ids))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    ids = torch.randint(0, 20, (2, 9))
    ids[0, :3] = torch.tensor(ROWS)
    return Net().eval(), ids


def _diff(a, b) -> float:
    return (a - b).abs().max().item()


def test_standalone_matches_peft(setup, tmp_path):
    from peft import PeftModel, TrainableTokensConfig, get_peft_model

    model, ids = setup
    fresh = gp.compile(model, gp.Plan([gp.TrainableTokens(targets=["emb"], token_indices=ROWS)]), (ids,))
    cm = gp.compile(model, gp.Plan([gp.TrainableTokens(targets=["emb"], token_indices=ROWS, init="random")]), (ids,))
    assert list(cm.adapter_state_dict()) == ["emb.trainable_tokens_delta"]  # the indices stay in the config
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))  # the rows' own values: a no-op start
        gp.export_peft(cm, tmp_path / "ours")
        config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
        assert config["peft_type"] == "TRAINABLE_TOKENS" and config["token_indices"] == ROWS
        back = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ours")).eval()
        assert _diff(back(ids), cm(ids)) == 0.0 and _diff(cm(ids), model(ids)) > 0.1
        assert _diff(cm.merge()(ids), back(ids)) == 0.0
        theirs = get_peft_model(copy.deepcopy(model), TrainableTokensConfig(target_modules=["emb"], token_indices=[2, 4],
                                                                            init_weights=False)).eval()
        theirs.save_pretrained(str(tmp_path / "peft"))
        imported = gp.import_peft(copy.deepcopy(model), tmp_path / "peft", (ids,))
        assert imported.plan.rules[0].token_indices == [2, 4]
        assert _diff(imported(ids), theirs(ids)) == 0.0


def test_beside_lora_both_ways(setup, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model, ids = setup
    plan = gp.Plan([gp.LoRA(targets=["lin"], r=2, init="random"),
                    gp.TrainableTokens(targets=["emb"], token_indices=ROWS, init="random")])
    cm = gp.compile(model, plan, (ids,))
    gp.export_peft(cm, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["trainable_token_indices"] == {"emb": ROWS}
    back = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ours")).eval()
    theirs = get_peft_model(copy.deepcopy(model), LoraConfig(target_modules=["lin"], r=2, init_lora_weights=False,
                                                             trainable_token_indices={"emb": [2, 4]})).eval()
    with torch.no_grad():
        theirs.base_model.model.emb.token_adapter.trainable_tokens_delta["default"].normal_()
        theirs.save_pretrained(str(tmp_path / "peft"))
        imported = gp.import_peft(copy.deepcopy(model), tmp_path / "peft", (ids,))
        assert _diff(back(ids), cm(ids)) == 0.0
        assert _diff(imported(ids), theirs(ids)) < 1e-6
        assert _diff(cm.merge()(ids), cm(ids)) < 1e-6


def test_training_changes_only_the_rows_and_exports(setup, tmp_path):
    from graphpeft.backends.onnx import OnnxRunner, OnnxTrainer

    model, ids = setup
    cm = gp.compile(model, gp.Plan([gp.TrainableTokens(targets=["emb"], token_indices=ROWS, init="random")]), (ids,))
    cm.export_onnx(tmp_path / "u.onnx", merged=False)
    with torch.no_grad():
        assert _diff(torch.from_numpy(OnnxRunner(tmp_path / "u.onnx").run([ids])[0]), cm(ids)) < 1e-6
    target = torch.randn(2, 9, 4)
    step = cm.compile_training("mse", gp.optim.SGD(lr=0.5))
    step.export_onnx(tmp_path / "t.onnx")
    trainer = OnnxTrainer(tmp_path / "t.onnx")
    before = cm.trainable_parameters()["emb.trainable_tokens_delta"].detach().clone()
    torch_losses = [float(step(ids, target)) for _ in range(2)]
    ort_losses = [float(trainer.step(ids, target)) for _ in range(2)]
    assert max(abs(a - b) for a, b in zip(torch_losses, ort_losses)) < 1e-6
    after = cm.trainable_parameters()["emb.trainable_tokens_delta"].detach()
    assert not torch.equal(before, after)
    assert _diff(trainer.adapter_state_dict()["emb.trainable_tokens_delta"], after) < 1e-6
    merged = cm.merge().graph_module.get_parameter("emb.weight")
    others = [i for i in range(20) if i not in ROWS]
    assert torch.equal(merged[others], model.emb.weight[others])  # the frozen rows did not move
    assert torch.equal(merged[ROWS], after)


def test_tied_head_and_list_form_of_a_transformers_model(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    model, ids = LlamaForCausalLM(config).eval(), torch.randint(0, 40, (2, 6))
    ids[0, 0] = 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(copy.deepcopy(model), LoraConfig(target_modules=["q_proj"], r=2, init_lora_weights=False,
                                                                 trainable_token_indices=[3, 7])).eval()
        with torch.no_grad():
            theirs.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"].normal_()
        theirs.save_pretrained(str(tmp_path / "peft"))
    cm = gp.import_peft(copy.deepcopy(model), tmp_path / "peft", (ids,), {"use_cache": False})
    rec = cm.adapters()["model.embed_tokens"]
    assert rec["method"] == "trainable_tokens" and rec["tied"] == ["lm_head"]  # the input embeddings (list form)
    logits = lambda out: out["logits"] if isinstance(out, dict) else out[0]  # noqa: E731
    with torch.no_grad():
        want = theirs(ids, use_cache=False).logits
        assert _diff(logits(cm(ids)), want) < 1e-5  # the tied lm_head reads the same rows
        assert _diff(logits(cm.merge()(ids)), want) < 1e-5
    gp.export_peft(cm, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        assert _diff(back(ids, use_cache=False).logits, want) < 1e-5


def test_refusals(setup, tmp_path):
    model, ids = setup
    for bad, why in (([], "non-empty list"), ([1, 1], "twice: \\[1\\]"), ([-1], "integers >= 0"), (3, "non-empty list")):
        with pytest.raises(gp.PlanError, match=why):
            gp.TrainableTokens(targets=["emb"], token_indices=bad)
    with pytest.raises(gp.PlanError, match="token index 25 is out of range: the layer has 20 tokens"):
        gp.compile(model, gp.Plan([gp.TrainableTokens(targets=["emb"], token_indices=[25])]), (ids,))
    cm = gp.compile(model, gp.Plan([gp.IA3(targets=["lin"]), gp.TrainableTokens(targets=["emb"], token_indices=[2])]),
                    (ids,))
    with pytest.raises(gp.AdapterFileError, match="only beside a LoRA"):
        gp.export_peft(cm, tmp_path / "x")
