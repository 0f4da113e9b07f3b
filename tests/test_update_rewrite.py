"""The sparse-update rewrites (issue 4, part 1): for each, structure (ops created, roles),
match count and numerical equivalence of the rewritten graph; the channel-fraction split into
a trainable slice and a frozen rest (linear, GPT-2's addmm, conv), its row choice (first,
magnitude, gradient probe), provenance and the verifier, and exact reassembly on merge/export.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import graphpeft as gp
from graphpeft.graph import Role, get_tensor, graph_meta, op_count
from graphpeft.passes.update.slice_rows import row_norms

from conftest import ARCHS, call_ops, created_nodes, max_diff

aten = torch.ops.aten


def compile_arch(name: str, rules, **kw):
    arch = ARCHS[name]
    args, kwargs = arch.inputs()
    model = arch.build()
    ref_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cm = gp.compile(model, gp.Plan(rules), args, kwargs, **kw)
    return model, ref_state, cm, args, kwargs


def rewrites(cm, rule_name: str) -> list[str]:
    return [m.origin for m in cm._ctx.report if m.ok and m.stage == "rewrite" and m.rule == rule_name]


def trainable(cm) -> dict[str, str]:
    return {k: v.value for k, v in cm.roles().items() if v.trainable}


# --- whole tensors: roles only, graph unchanged ------------------------------------------------------


def test_full_update_of_the_last_block_sets_roles_only():
    model, _, cm, args, kwargs = compile_arch("llama", [gp.Update(targets=".*", layers=[-1])])
    assert len(rewrites(cm, "update[.*; layers=[-1]]")) == 7
    assert set(trainable(cm)) == {f"model.layers.1.{m}.weight" for m in
                                  ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert set(trainable(cm).values()) == {"trainable"}
    assert op_count(cm.graph_module) == cm.base_op_count and not created_nodes(cm.graph_module)
    assert max_diff(cm(*args, **kwargs), model(*args, **kwargs)) == 0.0
    gp.verify(cm.graph_module)


def test_bias_only_and_norm_only():
    _, _, cm, _, _ = compile_arch("bert", [gp.Update(targets=".*", part="bias")])
    assert len(rewrites(cm, "update[.*; part=bias]")) == 13
    assert all(n.endswith(".bias") for n in trainable(cm)) and len(trainable(cm)) == 13
    _, _, cm, _, _ = compile_arch("llama", [gp.Update(targets=".*", part="norm")])
    assert len(rewrites(cm, "update[.*; part=norm]")) == 5
    assert sorted(trainable(cm)) == sorted(["model.layers.0.input_layernorm.weight",
                                            "model.layers.0.post_attention_layernorm.weight",
                                            "model.layers.1.input_layernorm.weight",
                                            "model.layers.1.post_attention_layernorm.weight", "model.norm.weight"])
    assert "model.norm (norm LlamaRMSNorm 32->32): update[.*; part=norm]" in cm.explain()


def test_lora_and_bias_update_in_one_plan():
    _, _, cm, args, kwargs = compile_arch("bert", [gp.LoRA(targets=["query", "value"], r=2),
                                                   gp.Update(targets=["query", "value"], part="bias")])
    roles = trainable(cm)
    assert sum(r == "adapter" for r in roles.values()) == 8 and sum(r == "trainable" for r in roles.values()) == 4
    assert len(cm.adapters()) == 4
    merged = cm.merge()  # biases stay, adapters fold
    assert op_count(merged.graph_module) == cm.base_op_count


# --- channel fraction: slice + rest ---------------------------------------------------------------------


def test_fraction_splits_linear_into_trainable_slice_and_frozen_rest():
    model, ref, cm, args, kwargs = compile_arch(
        "llama", [gp.Update(targets=["down_proj", "q_proj"], layers=[-1], fraction=0.25, select="magnitude")])
    gm = cm.graph_module
    name = "update[down_proj,q_proj; layers=[-1]; fraction=0.25; select=magnitude]"
    assert rewrites(cm, name) == ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    slices = graph_meta(gm)["slices"]
    rec = slices["model.layers.1.mlp.down_proj"]
    w = ref["model.layers.1.mlp.down_proj.weight"]
    expected_rows = sorted(torch.topk(w.double().norm(dim=1), 8).indices.tolist())
    assert rec["rows"] == expected_rows and len(rec["rows"]) == 8
    # structure: two linears reading the slice and the rest, their concatenation, the permutation
    nodes = created_nodes(gm, "model.layers.1.mlp.down_proj")
    assert [n.target if n.op == "call_function" else n.op for n in nodes] == [
        "get_attr", "get_attr", aten.linear.default, aten.linear.default, aten.cat.default, "get_attr",
        aten.index_select.default]
    assert [n.meta["graphpeft"]["part"] for n in nodes] == ["slice", "rest", "slice", "rest", "join", "order", "join"]
    assert all(n.meta["graphpeft"]["pass_name"] == "slice_rows" and n.meta.get("nn_module_stack") for n in nodes)
    roles = cm.roles()
    assert roles["model.layers.1.mlp.down_proj.weight_slice"] == Role.TRAINABLE_SLICE
    assert roles["model.layers.1.mlp.down_proj.weight_rest"] == Role.FROZEN
    assert roles["model.layers.1.mlp.down_proj.slice_order"] == Role.BUFFER
    assert "model.layers.1.mlp.down_proj.weight" not in roles  # the original tensor is gone
    assert torch.equal(get_tensor(gm, "model.layers.1.mlp.down_proj.weight_slice"), w[expected_rows])
    assert tuple(get_tensor(gm, "model.layers.1.mlp.down_proj.weight_rest").shape) == (24, 64)
    assert cm.num_parameters(trainable_only=True) == 8 * 64 + 8 * 32
    gp.verify(gm)
    # the same function (float rounding of a split matmul)
    assert max_diff(cm(*args, **kwargs), model(*args, **kwargs)) < 1e-5
    # merge reassembles exactly: the base graph again, the original weights bit for bit
    merged = cm.merge()
    mgm = merged.graph_module
    assert op_count(mgm) == cm.base_op_count and not graph_meta(mgm).get("slices")
    assert torch.equal(get_tensor(mgm, "model.layers.1.mlp.down_proj.weight"), w)
    assert "model.layers.1.mlp.down_proj" in [l.path for l in gp.find_layers(mgm)]
    assert max_diff(merged(*args, **kwargs), model(*args, **kwargs)) == 0.0
    assert slices  # the source model keeps its slices


def test_first_k_rows_need_no_permutation():
    _, ref, cm, _, _ = compile_arch("llama", [gp.Update(targets=["gate_proj"], layers=[0], fraction=0.5)])
    nodes = created_nodes(cm.graph_module, "model.layers.0.mlp.gate_proj")
    assert aten.index_select.default not in [n.target for n in nodes]
    assert graph_meta(cm.graph_module)["slices"]["model.layers.0.mlp.gate_proj"]["rows"] == list(range(32))
    assert torch.equal(get_tensor(cm.graph_module, "model.layers.0.mlp.gate_proj.weight_slice"),
                       ref["model.layers.0.mlp.gate_proj.weight"][:32])


def test_fraction_of_gpt2_addmm_slices_columns():
    model, ref, cm, args, kwargs = compile_arch("gpt2", [gp.Update(targets=["c_fc"], fraction=0.25, select="magnitude")])
    assert len(graph_meta(cm.graph_module)["slices"]) == 2
    nodes = created_nodes(cm.graph_module, "transformer.h.0.mlp.c_fc")
    assert [n.target for n in nodes if n.op == "call_function"] == [
        aten.mm.default, aten.mm.default, aten.cat.default, aten.index_select.default, aten.add.Tensor]
    w = ref["transformer.h.0.mlp.c_fc.weight"]  # (in, out): output channels are columns
    rows = graph_meta(cm.graph_module)["slices"]["transformer.h.0.mlp.c_fc"]["rows"]
    assert rows == sorted(torch.topk(w.double().norm(dim=0), 32).indices.tolist())
    assert tuple(get_tensor(cm.graph_module, "transformer.h.0.mlp.c_fc.weight_slice").shape) == (32, 32)
    assert cm.roles()["transformer.h.0.mlp.c_fc.bias"] == Role.TRAINABLE  # the bias of a sliced layer trains whole
    assert max_diff(cm(*args, **kwargs), model(*args, **kwargs)) < 1e-5
    merged = cm.merge()
    assert torch.equal(get_tensor(merged.graph_module, "transformer.h.0.mlp.c_fc.weight"), w)
    assert op_count(merged.graph_module) == cm.base_op_count


def test_fraction_of_a_conv_slices_output_channels():
    model, ref, cm, args, kwargs = compile_arch("cnn", [gp.Update(targets=["layer2.conv1", "fc"], fraction=0.5,
                                                                  select="magnitude")])
    assert len(rewrites(cm, "update[layer2.conv1,fc; fraction=0.5; select=magnitude]")) == 2
    nodes = created_nodes(cm.graph_module, "layer2.conv1")
    convs = [n for n in nodes if n.target == aten.conv2d.default]
    assert len(convs) == 2 and [n for n in nodes if n.target == aten.cat.default][0].args[1] == 1
    w = ref["layer2.conv1.weight"]
    rows = graph_meta(cm.graph_module)["slices"]["layer2.conv1"]["rows"]
    assert rows == sorted(torch.topk(w.double().flatten(1).norm(dim=1), 8).indices.tolist())
    assert max_diff(cm(*args, **kwargs), model(*args, **kwargs)) < 1e-5
    merged = cm.merge()
    assert torch.equal(get_tensor(merged.graph_module, "layer2.conv1.weight"), w)
    assert call_ops(merged.graph_module) == call_ops(gp.trace(model, args, kwargs).gm)


def test_gradient_probe_chooses_rows_by_gradient_norm():
    arch = ARCHS["llama"]
    args, kwargs = arch.inputs()
    ids = args[0]
    # the reference gradient of down_proj in layer 1 under next-token cross-entropy
    model = arch.build()
    logits = model(ids, use_cache=False).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    g = torch.autograd.grad(loss, model.model.layers[1].mlp.down_proj.weight)[0]
    expected = sorted(torch.topk(row_norms(g), 8).indices.tolist())
    model.zero_grad(set_to_none=True)
    cm = gp.compile(model, gp.Plan([gp.Update(targets=["down_proj"], layers=[-1], fraction=0.25, select="gradient")]),
                    args, kwargs)
    assert graph_meta(cm.graph_module)["slices"]["model.layers.1.mlp.down_proj"]["rows"] == expected
    assert expected != list(range(8))  # the probe chose, not the default order
    # an explicit probe batch and loss (here a different objective) change the choice
    other = gp.compile(arch.build(), gp.Plan([gp.Update(targets=["down_proj"], layers=[-1], fraction=0.25,
                                                        select="gradient")]), args, kwargs,
                       options={"probe_batch": (ids,), "probe_loss": lambda out: out.logits.pow(2).mean()})
    assert graph_meta(other.graph_module)["slices"]["model.layers.1.mlp.down_proj"]["rows"] != expected


def test_export_of_a_sliced_model_is_reassembled(tmp_path):
    from graphpeft.backends.onnx import OnnxRunner

    model, ref, cm, args, kwargs = compile_arch("llama", [gp.Update(targets=["q_proj"], fraction=0.5,
                                                                    select="magnitude")])
    path = tmp_path / "model.onnx"
    cm.export_onnx(path)
    import onnx

    names = {i.name for i in onnx.load(str(path)).graph.initializer}
    assert not any("weight_slice" in n or "weight_rest" in n for n in names)
    out = OnnxRunner(path).run([t.numpy() for t in cm.flat_inputs(*args, **kwargs)])
    assert float(abs(torch.as_tensor(out[0]) - model(*args, **kwargs).logits.detach()).max()) < 1e-5


def test_training_an_updated_tensor_leaves_the_source_model_untouched():
    import graphpeft as gp
    from models import tiny_llama, token_batch

    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = token_batch()
    cm = gp.compile(model, gp.Plan([gp.Update(targets=r".*\.layers\.1\.mlp\.down_proj"), gp.Update(targets=".*", part="norm")]),
                    (ids,), {"use_cache": False})
    step = cm.compile_training("causal_lm", gp.optim.SGD(lr=0.5))
    for _ in range(2):
        step(ids)
    name = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(cm.graph_module.get_parameter(name), before[name])  # it trained
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the user's model did not
