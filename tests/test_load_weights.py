"""Big models: compile on the meta device, then load the base weights from safetensors
(``CompiledModel.load_base_weights``). Tiny Llamas only; the 1B/7B figures are in
``benchmarks/load_weights.py``."""

from __future__ import annotations

import os

import pytest
import torch

import graphpeft as gp

from models import tiny_llama

CFG = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=128)
IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
KW = dict(example_inputs=(IDS,), example_kwargs={"use_cache": False})
LORA = [gp.LoRA(targets=["q_proj", "v_proj"], r=4, init="random")]


def _skeleton(params_only: bool = True):
    """The tiny Llama without weights: parameters on meta (buffers real), or everything on meta."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    with init_empty_weights() if params_only else torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**CFG)).eval()


@pytest.fixture(scope="module")
def real():
    return tiny_llama(layers=1, hidden=32, vocab=128, seed=0)


@pytest.fixture(scope="module")
def sharded(real, tmp_path_factory):
    """``save_pretrained`` in several shards (with ``model.safetensors.index.json``)."""
    folder = tmp_path_factory.mktemp("sharded")
    real.save_pretrained(folder, max_shard_size="10KB")
    assert os.path.isfile(folder / "model.safetensors.index.json")
    return folder


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> None:
    assert (a - b).abs().max().item() <= tol


def _trainables_close(ref: gp.CompiledModel, cm: gp.CompiledModel) -> None:
    r, c = ref.trainable_parameters(), cm.trainable_parameters()
    assert sorted(r) == sorted(c)
    for n in r:
        _close(r[n], c[n])


def test_meta_compile_then_load_matches_real_compile(real, sharded):
    plan = gp.Plan([*LORA, gp.DoRA(targets=["o_proj"], r=2)])  # DoRA's magnitude reads the weight
    ref = gp.compile(real, plan, **KW)
    cm = gp.compile(_skeleton(), plan, **KW)
    assert cm.meta_tensors()
    step = cm.compile_training("causal_lm", gp.optim.SGD(lr=0.1), example_batch=(IDS, IDS))
    assert step.memory_report().peak_bytes > 0  # planned on meta, before any weight exists
    with pytest.raises(gp.WeightsError, match="meta device"):
        cm(IDS)
    report = step.load_base_weights(sharded)
    assert report.loaded == len(real.state_dict())  # every saved tensor (not the non-persistent inv_freq)
    assert len(report.files) > 1 and not report.still_meta and len(report.adapters_initialized) == 3
    _close(ref(IDS).logits, cm(IDS).logits)
    ref_step = ref.compile_training("causal_lm", gp.optim.SGD(lr=0.1))
    _close(ref_step(IDS, IDS), step(IDS, IDS))
    _trainables_close(ref, cm)
    _close(ref.merge()(IDS).logits, cm.merge()(IDS).logits)


def test_everything_on_meta_needs_the_buffers_a_checkpoint_lacks(real, sharded):
    cm = gp.compile(_skeleton(params_only=False), LORA, **KW)
    with pytest.raises(gp.WeightsError, match=r"rotary_emb\.inv_freq.*init_empty_weights") as e:
        cm.load_base_weights(sharded)
    assert "nothing was loaded" in str(e.value) and len(cm.meta_tensors()) == len(cm.roles())
    cm.load_base_weights(sharded, extra={"model.rotary_emb.inv_freq": real.model.rotary_emb.inv_freq})
    _close(gp.compile(real, LORA, **KW)(IDS).logits, cm(IDS).logits)


def test_single_file_and_key_map(real, tmp_path):
    from safetensors.torch import save_file

    state = {"base." + k: v.contiguous() for k, v in real.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    cm = gp.compile(_skeleton(), LORA, **KW)
    with pytest.raises(gp.WeightsError, match="unexpected checkpoint keys.*key_map"):
        cm.load_base_weights(tmp_path / "w.safetensors")
    cm.load_base_weights(tmp_path / "w.safetensors", key_map=lambda k: k[len("base."):])
    _close(gp.compile(real, LORA, **KW)(IDS).logits, cm(IDS).logits)


def _save(state: dict, folder) -> str:
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, "model.safetensors"))
    return str(folder)


def test_bad_checkpoints_name_the_tensor_and_load_nothing(real, tmp_path):
    cm = gp.compile(_skeleton(), LORA, **KW)
    n_meta = len(cm.meta_tensors())
    good = dict(real.state_dict())
    q = "model.layers.0.self_attn.q_proj.weight"
    cases = {
        "shape": ({**good, q: torch.zeros(31, 32)}, rf"{q} \(in model.safetensors\) has shape \[31, 32\], "
                                                   r"the graph's .* needs \[32, 32\]"),
        "dtype": ({**good, q: good[q].half()}, rf"{q} .* is F16, the graph's .* is float32"),
        "missing": ({k: v for k, v in good.items() if k != q}, rf"missing from the checkpoint: {q}"),
        "unexpected": ({**good, "extra.weight": torch.zeros(2)}, r"unexpected checkpoint keys .*extra\.weight"),
    }
    for name, (state, pattern) in cases.items():
        with pytest.raises(gp.WeightsError, match=pattern):
            cm.load_base_weights(_save(state, tmp_path / name))
        assert len(cm.meta_tensors()) == n_meta, name  # nothing half-loaded
    report = cm.load_base_weights(tmp_path / "missing", strict=False)
    assert report.missing == [q] and q in report.still_meta
    with pytest.raises(gp.WeightsError, match="meta device"):
        cm(IDS)
    report = cm.load_base_weights(tmp_path / "dtype", cast=True)  # the f16 weight is cast on load
    assert not report.still_meta and cm.graph_module.get_parameter(q).dtype == torch.float32
    with pytest.raises(gp.WeightsError, match="does not exist"):
        cm.load_base_weights(tmp_path / "nowhere")


def test_quantized_base_is_quantized_as_it_loads(real, sharded):
    # LoRA on a quantized layer too: its adapter is initialized from the float weight, as in a
    # compile from real weights (adapters before quantization)
    plan = gp.Plan([gp.LoRA(targets=["q_proj", "gate_proj"], r=4, init="random"),
                    gp.Quantize(targets=["gate_proj"], dtype="nf4", group_size=32),
                    gp.Quantize(targets=["up_proj", "down_proj"], dtype="int8", group_size=32)])
    ref = gp.compile(real, plan, **KW)
    cm = gp.compile(_skeleton(), plan, **KW)
    report = cm.load_base_weights(sharded)
    assert len(report.converted) == 3 and set(report.converted.values()) == {"int8", "nf4"}
    assert not report.still_meta and len(report.adapters_initialized) == 2
    for name in gp.passes.quantize.quantize_weights.quantized(cm.graph_module):
        assert name not in cm.roles()  # the float weight never entered the graph
    _trainables_close(ref, cm)  # adapters as initialized by the real compile
    _close(ref(IDS).logits, cm(IDS).logits)


def test_adapter_left_on_meta_is_loaded_with_adapter_io(real, sharded):
    plan = [gp.VeRA(targets=["q_proj", "v_proj"], r=4)]  # shared projections: not initialized per layer
    ref = gp.compile(real, plan, **KW)
    cm = gp.compile(_skeleton(), plan, **KW)
    report = cm.load_base_weights(sharded)
    assert report.still_meta and all("vera" in n for n in report.still_meta)
    with pytest.raises(gp.WeightsError, match="load_adapter"):
        cm(IDS)
    cm.load_adapter_state_dict(ref.adapter_state_dict(include_constants=True), include_constants=True)
    assert not cm.meta_tensors()
    _close(ref(IDS).logits, cm(IDS).logits)


def test_reloading_a_real_model_keeps_its_training_step(real, tmp_path):
    other = tiny_llama(layers=1, hidden=32, vocab=128, seed=5)
    folder = _save(other.state_dict(), tmp_path / "other")
    cm = gp.compile(real, LORA, **KW)
    step = cm.compile_training("causal_lm", gp.optim.SGD(lr=0.1))
    before = dict(cm.trainable_parameters())
    cm.load_base_weights(folder)  # in place: the step's graph shares the tensors
    assert all(torch.equal(before[n], t) for n, t in cm.trainable_parameters().items())  # adapters kept
    ref = gp.compile(other, LORA, **KW)
    ref.load_adapter_state_dict(cm.adapter_state_dict())
    logits = ref(IDS).logits
    _close(logits, cm(IDS).logits)
    # the step compiled before the reload trains on the new weights: its loss is theirs
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), IDS[:, 1:].reshape(-1))
    _close(step(IDS, IDS), expected, 1e-5)


def test_tied_weights_load_under_any_of_their_names(tmp_path):
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import GPT2LMHeadModel

    from models import tiny_gpt2

    real = tiny_gpt2(layers=1)
    plan = [gp.LoRA(targets=["c_attn"], r=4, init="random")]  # GPT-2's Conv1D: addmm with W as (in, out)
    with init_empty_weights():
        skeleton = GPT2LMHeadModel(real.config).eval()
    untied = gp.compile(skeleton, plan, **KW)
    real.save_pretrained(tmp_path / "hf")  # the tied lm_head is stored once, as transformer.wte.weight
    with pytest.raises(gp.WeightsError, match=r"lm_head\.weight.*tie_weights"):
        untied.load_base_weights(tmp_path / "hf")
    skeleton.tie_weights()  # as from_pretrained does: one tensor, so one graph tensor
    cm = gp.compile(skeleton, plan, **KW)
    state = {("lm_head.weight" if k == "transformer.wte.weight" else k): v.contiguous()
             for k, v in real.state_dict().items() if k != "lm_head.weight"}
    save_file(state, tmp_path / "other_name.safetensors")  # stored under its other name
    cm.load_base_weights(tmp_path / "other_name.safetensors")
    _close(gp.compile(real, plan, **KW)(IDS).logits, cm(IDS).logits)
