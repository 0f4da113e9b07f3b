"""Property-based fuzzing (issue 14, first cut): random MLP / conv stacks x random plans through
compile -> peft parity (LoRA) -> merge -> deepcopy -> ONNX (merged, onnxruntime) -> training step.

A few examples run in the normal suite; ``GRAPHPEFT_FUZZ_EXAMPLES=500 pytest tests/test_compat_fuzz.py``
is the long run. Ranks are drawn up to 12, so ranks above the layer (a warning, as in PEFT) are
exercised too."""

from __future__ import annotations

import copy
import os
import tempfile
import warnings

import pytest
import torch

import graphpeft as gp

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("GRAPHPEFT_FUZZ_EXAMPLES", "4"))


@st.composite
def cases(draw):
    conv = draw(st.booleans())
    layers: list[torch.nn.Module] = []
    adaptable: list[str] = []
    if conv:
        chans = draw(st.lists(st.integers(1, 6), min_size=2, max_size=4))
        for cin, cout in zip(chans, chans[1:]):
            k = draw(st.integers(1, 3))
            adaptable.append(str(len(layers)))
            layers += [torch.nn.Conv2d(cin, cout, k, padding=k // 2), torch.nn.ReLU()]
        layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()]
        width = chans[-1]
        x_shape = (2, chans[0], 6, 6)
    else:
        widths = draw(st.lists(st.integers(1, 12), min_size=2, max_size=4))
        for cin, cout in zip(widths, widths[1:]):
            adaptable.append(str(len(layers)))
            layers += [torch.nn.Linear(cin, cout), torch.nn.Tanh()]
        width = widths[-1]
        x_shape = (3, widths[0])
    out = draw(st.integers(1, 5))
    adaptable.append(str(len(layers)))
    layers.append(torch.nn.Linear(width, out))
    targets = draw(st.lists(st.sampled_from(adaptable), min_size=1, unique=True))
    linear_only = all(isinstance(layers[int(t)], torch.nn.Linear) for t in targets)
    method = draw(st.sampled_from(["lora", "ia3"] + (["dora"] if linear_only else [])))
    r = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**16))
    return layers, x_shape, out, method, targets, r, seed


def _rule(method, targets, r):
    if method == "ia3":
        return gp.IA3(targets=targets, init="random")
    cls = gp.LoRA if method == "lora" else gp.DoRA
    return cls(targets=targets, r=r, alpha=2 * r, init="random")


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(cases())
def test_random_models_and_plans(case):
    from graphpeft.backends.onnx import OnnxRunner

    layers, x_shape, out, method, targets, r, seed = case
    torch.manual_seed(seed)
    model = torch.nn.Sequential(*copy.deepcopy(layers)).eval()
    x, y = torch.randn(*x_shape), torch.randn(x_shape[0], out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gp.GraphPeftWarning)  # ranks above the layer are allowed
        cm = gp.compile(model, gp.Plan([_rule(method, targets, r)]), (x,))
    assert {rec["layer"] for rec in cm.adapters().values()} == set(targets)
    cm.eval()
    with torch.no_grad():
        ours = cm(x)
        assert torch.isfinite(ours).all()
        if method == "lora":  # peft is the oracle
            from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

            pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
            set_peft_model_state_dict(pm, {"base_model.model." + k: v for k, v in cm.adapter_state_dict().items()})
            assert (pm.eval()(x) - ours).abs().max().item() <= 1e-5
        merged = cm.merge()
        assert (merged(x) - ours).abs().max().item() <= 1e-4 * (1 + ours.abs().max().item())
        assert torch.equal(copy.deepcopy(cm)(x), ours)
    with tempfile.TemporaryDirectory() as d:
        cm.export_onnx(os.path.join(d, "m.onnx"), merged=True)
        ort = OnnxRunner(os.path.join(d, "m.onnx")).run(cm.flat_inputs(x))[0]
        assert abs(torch.as_tensor(ort) - ours).max().item() <= 1e-4 * (1 + ours.abs().max().item())
    step = cm.compile_training("mse", gp.optim.SGD(lr=1e-3))
    before = {k: v.clone() for k, v in cm.trainable_parameters().items()}
    loss = step(x, y)
    assert torch.isfinite(loss) and step.skipped_steps == 0
    assert any(not torch.equal(before[k], v) for k, v in cm.trainable_parameters().items())
