"""PEFT's ``target_parameters`` (LoRA on a parameter itself, MoE expert stacks included) and the
task-type-aware ``"all-linear"`` (issue 14). ``peft`` is the oracle: the same adapter values give
the same outputs, merges and folders both ways; then ONNX and a training step."""

from __future__ import annotations

import copy
import json
import tempfile
import warnings

import pytest
import torch
import torch.nn as nn

import graphpeft as gp

peft = pytest.importorskip("peft")


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(10, 20), nn.Linear(20, 2)

    def forward(self, x):
        return torch.log_softmax(self.lin1(torch.relu(self.lin0(x))), -1)


class Experts(nn.Module):
    """Experts stored ``(experts, in, out)`` (``is_transposed``, as GPT-OSS), applied densely."""

    is_transposed = True

    def __init__(self, experts: int = 3, dim: int = 6, hidden: int = 8) -> None:
        super().__init__()
        self.up = nn.Parameter(torch.randn(experts, dim, hidden) * 0.3)
        self.down = nn.Parameter(torch.randn(experts, hidden, dim) * 0.3)

    def forward(self, x):  # x (batch, dim): every expert, summed
        h = torch.relu(torch.einsum("bd,edh->ebh", x, self.up))
        return torch.einsum("ebh,ehd->bd", h, self.down)


class MoENet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts, self.head = Experts(), nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.experts(x))


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=3, num_experts_per_tok=2)
    return MixtralForCausalLM(cfg).eval(), torch.randint(0, 64, (2, 7)), {"use_cache": False}


def _out(o):
    return o if isinstance(o, torch.Tensor) else o.logits


def _diff(a, b) -> float:
    return (a - b).abs().max().item()


def _peft_roundtrip(base, x, kw, **options):
    """PEFT builds a non-identity adapter and saves it; graphpeft imports it. Checks unmerged and
    merged outputs (and merged weights) against PEFT, then exports back and PEFT loads that."""
    config = peft.LoraConfig(init_lora_weights=False, **{"target_modules": [], **options})
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as d, tempfile.TemporaryDirectory() as d2:
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), config).eval()
        pm.save_pretrained(d)
        cm = gp.import_peft(copy.deepcopy(base), d, (x,), kw)
        with torch.no_grad():
            want = _out(pm(x, **kw))
            assert _diff(want, _out(base(x, **kw))) > 1e-3  # the adapter does something
            assert _diff(_out(cm(x)), want) < 1e-5
            pmerged = copy.deepcopy(pm).merge_and_unload()
            merged = cm.merge()
            assert _diff(_out(merged(x)), _out(pmerged(x, **kw))) < 1e-5
            theirs = dict(pmerged.named_parameters())
            for name in config.target_parameters:
                full = next(n for n in theirs if n == name or n.endswith("." + name))
                assert _diff(merged.graph_module.get_parameter(full), theirs[full]) < 1e-6, full
        gp.export_peft(cm, d2)
        saved = json.load(open(f"{d2}/adapter_config.json"))
        assert saved["fan_in_fan_out"] is False
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base), d2).eval()
        with torch.no_grad():
            assert _diff(_out(back(x, **kw)), want) < 1e-6
    return cm


@pytest.mark.parametrize("options", [{"target_parameters": ["lin0.weight"]},
                                     {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"]}],
                         ids=["param", "module+param"])
def test_plain_parameter_matches_peft(options):
    torch.manual_seed(0)
    _peft_roundtrip(MLP().eval(), torch.randn(4, 10), {}, **options)


def test_mixtral_experts_match_peft_export_and_train(tmp_path):
    model, ids, kw = _mixtral()
    cm = _peft_roundtrip(model, ids, kw, r=2, lora_alpha=4, target_modules=["q_proj"],
                         target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    shapes = {k: tuple(v.shape) for k, v in cm.adapter_state_dict().items() if "experts" in k}
    # PEFT's ParamWrapper shapes: A (r*E, in), B (out, r*E) per parameter (E=3, r=2)
    assert shapes == {"model.layers.0.mlp.experts.lora_parameters.gate_up_proj.lora_A.weight": (6, 16),
                      "model.layers.0.mlp.experts.lora_parameters.gate_up_proj.lora_B.weight": (48, 6),
                      "model.layers.0.mlp.experts.lora_parameters.down_proj.lora_A.weight": (6, 24),
                      "model.layers.0.mlp.experts.lora_parameters.down_proj.lora_B.weight": (16, 6)}
    _check_onnx_and_training(cm, ids, "causal_lm", tmp_path=tmp_path)


def test_transposed_experts_match_peft():
    torch.manual_seed(0)
    _peft_roundtrip(MoENet().eval(), torch.randn(5, 6), {}, r=2, target_parameters=["experts.up", "experts.down"])


def _check_onnx_and_training(cm, x, loss, *extra, tmp_path, lr=0.5):
    """Unmerged ONNX in onnxruntime, then two SGD steps in torch and onnxruntime: same losses,
    falling, every adapter tensor moved the same way."""
    from graphpeft.backends.onnx import OnnxRunner, OnnxTrainer

    cm.export_onnx(tmp_path / "u.onnx", merged=False)
    with torch.no_grad():
        want = _out(cm(x))
        assert _diff(torch.from_numpy(OnnxRunner(tmp_path / "u.onnx").run(cm.flat_inputs(x))[0]), want) < 1e-5
    step = cm.compile_training(loss, gp.optim.SGD(lr=lr))
    step.export_onnx(tmp_path / "t.onnx")
    trainer = OnnxTrainer(tmp_path / "t.onnx")
    before = {k: v.detach().clone() for k, v in cm.trainable_parameters().items()}
    torch_losses = [float(step(x, *extra)) for _ in range(2)]
    ort_losses = [float(trainer.step(x, *extra)) for _ in range(2)]
    assert torch_losses[1] < torch_losses[0]
    assert max(abs(a - b) for a, b in zip(torch_losses, ort_losses)) < 1e-5
    after = cm.trainable_parameters()
    assert all(not torch.equal(before[k], after[k]) for k in before)
    for k, v in trainer.adapter_state_dict().items():
        assert _diff(torch.as_tensor(v), after[k]) < 1e-5


def test_plan_option_structure_onnx_and_training(tmp_path):
    torch.manual_seed(0)
    model, x = MoENet().eval(), torch.randn(5, 6)
    rule = gp.LoRA(r=2, target_parameters=["experts.up", "experts.down"])
    assert rule.name == "lora[params:experts.up,experts.down]"
    assert gp.Plan.from_dict(gp.Plan([rule]).to_dict()) == gp.Plan([rule])
    data = {"rules": [{"lora": {"r": 2, "target_parameters": ["experts.up", "experts.down"]}}]}  # no targets
    assert gp.Plan.from_dict(data) == gp.Plan([rule])
    cm = gp.compile(model, gp.Plan([rule]), (x,))
    with torch.no_grad():
        assert _diff(cm(x), model(x)) < 1e-6  # B starts at zero
    joins = [n for n in cm.graph_module.graph.nodes if (n.meta.get("graphpeft") or {}).get("part") == "join"]
    assert sorted(str(n.target) for n in joins) == ["aten.baddbmm.default"] * 2
    assert all(n.meta["graphpeft"]["pass_name"] == "insert_lora" for n in joins)
    assert "+ experts.up (parameter Experts 6->8)" in cm.explain()
    for k, v in cm.trainable_parameters().items():  # a non-identity adapter
        with torch.no_grad():
            v.copy_(torch.randn(v.shape, generator=torch.Generator().manual_seed(len(k))) * 0.3)
    _check_onnx_and_training(cm, x, "mse", torch.randn(5, 2), tmp_path=tmp_path, lr=1e-3)


def test_refusals(tmp_path):
    with pytest.raises(gp.PlanError, match="plain LoRA"):
        gp.DoRA(target_parameters=["experts.down_proj"])
    with pytest.raises(gp.PlanError, match="dropout"):
        gp.LoRA(target_parameters=["experts.down_proj"], dropout=0.1)
    with pytest.raises(gp.PlanError, match="lora_bias"):
        gp.LoRA(target_parameters=["lin0.weight"], lora_bias=True)
    with pytest.raises(gp.PlanError, match="'lora' only"):
        gp.Plan.from_dict({"rules": [{"ia3": {"targets": ["lin0"], "target_parameters": ["lin0.weight"]}}]})
    with pytest.raises(gp.PlanError, match="non-empty list"):
        gp.LoRA(target_parameters="lin0.weight")
    x = torch.randn(3, 10)
    with pytest.raises(gp.PlanError, match="matches no layer"):
        gp.compile(MLP().eval(), gp.Plan([gp.LoRA(target_parameters=["nothing.weight"])]), (x,))
    # a PEFT folder PEFT itself cannot build (DoRA on a parameter) is refused with the reason
    config = peft.LoraConfig(target_modules=[], target_parameters=["lin0.weight"]).to_dict()
    config.update(use_dora=True, peft_type="LORA", task_type=None)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config, default=list))
    from safetensors.torch import save_file

    save_file({"base_model.model.lin0.lora_A.weight": torch.zeros(8, 10),
               "base_model.model.lin0.lora_B.weight": torch.zeros(20, 8)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(gp.AdapterFileError, match="plain LoRA"):
        gp.import_peft(MLP().eval(), tmp_path, (x,))


# -- "all-linear" with a task type ---------------------------------------------------------------


def _seq_cls(arch: str):
    import transformers as tf

    torch.manual_seed(0)
    if arch == "bert":
        cfg = tf.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, num_labels=3)
        return tf.BertForSequenceClassification(cfg).eval(), {}
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=3, pad_token_id=0)
    return tf.LlamaForSequenceClassification(cfg).eval(), {"use_cache": False}


@pytest.mark.parametrize("arch,task_type", [("bert", "SEQ_CLS"), ("bert", None), ("llama", "SEQ_CLS")])
def test_all_linear_follows_the_task_type(arch, task_type):
    from graphpeft.graph import adapters, find_layers
    from graphpeft.peft_interop import plan_from_peft
    from graphpeft.trace import classifier_head_path

    model, kw = _seq_cls(arch)
    ids = torch.randint(1, 64, (2, 6))
    config = peft.LoraConfig(target_modules="all-linear", task_type=task_type)
    plan = plan_from_peft(config.to_dict(), [], input_embeddings=None, classifier_head=classifier_head_path(model))
    cm = gp.compile(model, plan, (ids,), kw)
    ours = {r["layer"] for r in adapters(cm.graph_module).values() if r["method"] == "lora"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(model), config)
    theirs = {n.removeprefix("base_model.model.") for n, m in pm.named_modules()
              if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert ours == theirs
    head = "classifier" if arch == "bert" else "score"
    assert (head in ours) == (task_type is None)
    assert {l.path for l in find_layers(cm.graph_module)} >= ours


def test_a_weight_is_adapted_once():
    x = torch.randn(3, 10)
    with pytest.raises(gp.PlanError, match="targets also selects lin0"):
        gp.compile(MLP().eval(), gp.Plan([gp.LoRA(targets=["lin0"], target_parameters=["lin0.weight"])]), (x,))
