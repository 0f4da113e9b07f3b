"""transformers families end to end: does LoRA on peft's default targets work on each?

    python -m benchmarks.families                  # every family; table under benchmarks/results/
    python -m benchmarks.families --only swin      # one family (or several: --only llama gpt2)
    python -m benchmarks.families --kind moe       # one kind (decoder, encoder, encdec, vision, speech, moe)

Each family is a tiny model built from its ``transformers`` config (random weights, no
downloads), wrapped so that it takes positional tensors and returns its main output tensor
(logits, last hidden state). The stages, each recorded as pass / FAIL with its reason:

- ``compile``: ``gp.compile`` with LoRA (r=4, random init) on peft's default target modules
  for the model type (``"all-linear"`` without the output embedding where peft has none; the
  convolutions of ResNet, which has no linear layer);
- ``peft``: peft's ``get_peft_model`` with the same weights gives the same outputs;
- ``merge``: ``cm.merge()`` gives the unmerged outputs;
- ``onnx``: the merged ONNX export run by onnxruntime gives them too;
- ``train``: one SGD step in torch (``causal_lm`` for decoders, the mean sine of the output
  otherwise) moves the adapters;
- ``train_ort``: the exported training step run by ``OnnxTrainer`` gives torch's losses and
  adapters over two steps.

Compile seconds (``gp.compile`` and ``compile_training``) are recorded beside the stages; they
depend on the machine's load. Results go to ``benchmarks/results/families.json`` and
``families.md``; a run with ``--only``/``--kind`` replaces those families' rows there.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

STAGES = ("compile", "peft", "merge", "onnx", "train", "train_ort")
ATOL = 1e-4
RESULTS = os.path.join(os.path.dirname(__file__), "results")
V, H, L, NH, FF = 128, 32, 2, 4, 64  # vocabulary, hidden, layers, heads, intermediate

log = logging.getLogger("benchmarks.families")


@dataclass
class Family:
    """One architecture family: its model type, kind, and how to build the tiny model."""

    name: str
    kind: str
    config: str
    model: str
    cfg: dict[str, Any] = field(default_factory=dict)
    inputs: str = "text"  # text, encdec, image, whisper, audio
    peft_type: Optional[str] = None  # the key of peft's default-target table, when not ``name``
    targets: Optional[list[str]] = None  # where "all-linear" finds nothing (a CNN): these modules


def _text(**kw: Any) -> dict[str, Any]:
    base = dict(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=NH, intermediate_size=FF,
                max_position_embeddings=64)
    return {**base, **kw}


_DEC = dict(num_key_value_heads=2)
_ENC = dict(type_vocab_size=2)
_VIT = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=H, num_hidden_layers=L, num_attention_heads=NH,
            intermediate_size=FF)

FAMILIES: list[Family] = [
    # decoders (peft's test suites: GPT-2, OPT, BLOOM, GPT-NeoX, GPT-J, Llama, Mistral, Gemma, Qwen2, ...)
    Family("llama", "decoder", "LlamaConfig", "LlamaForCausalLM", _text(**_DEC)),
    Family("mistral", "decoder", "MistralConfig", "MistralForCausalLM", _text(**_DEC)),
    Family("qwen2", "decoder", "Qwen2Config", "Qwen2ForCausalLM", _text(**_DEC)),
    Family("qwen3", "decoder", "Qwen3Config", "Qwen3ForCausalLM", _text(**_DEC, head_dim=8)),
    Family("gemma", "decoder", "GemmaConfig", "GemmaForCausalLM", _text(**_DEC, head_dim=8)),
    Family("gemma2", "decoder", "Gemma2Config", "Gemma2ForCausalLM", _text(**_DEC, head_dim=8)),
    Family("gemma3_text", "decoder", "Gemma3TextConfig", "Gemma3ForCausalLM", _text(**_DEC, head_dim=8)),
    Family("phi", "decoder", "PhiConfig", "PhiForCausalLM", _text()),
    Family("phi3", "decoder", "Phi3Config", "Phi3ForCausalLM", _text(pad_token_id=0)),
    Family("falcon", "decoder", "FalconConfig", "FalconForCausalLM",
           dict(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=NH)),
    Family("gpt2", "decoder", "GPT2Config", "GPT2LMHeadModel", dict(vocab_size=V, n_embd=H, n_layer=L, n_head=NH,
                                                                     n_positions=64)),
    Family("gpt_neox", "decoder", "GPTNeoXConfig", "GPTNeoXForCausalLM", _text()),
    Family("gpt_neo", "decoder", "GPTNeoConfig", "GPTNeoForCausalLM",
           dict(vocab_size=V, hidden_size=H, num_layers=L, num_heads=NH, attention_types=[[["global", "local"], 1]],
                max_position_embeddings=64, window_size=4)),
    Family("gptj", "decoder", "GPTJConfig", "GPTJForCausalLM", dict(vocab_size=V, n_embd=H, n_layer=L, n_head=NH,
                                                                     rotary_dim=4, n_positions=64)),
    Family("opt", "decoder", "OPTConfig", "OPTForCausalLM",
           dict(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=NH, ffn_dim=FF,
                word_embed_proj_dim=H, max_position_embeddings=64)),
    Family("bloom", "decoder", "BloomConfig", "BloomForCausalLM", dict(vocab_size=V, hidden_size=H, n_layer=L, n_head=NH)),
    Family("olmo2", "decoder", "Olmo2Config", "Olmo2ForCausalLM", _text(**_DEC)),
    Family("granite", "decoder", "GraniteConfig", "GraniteForCausalLM", _text(**_DEC)),
    Family("starcoder2", "decoder", "Starcoder2Config", "Starcoder2ForCausalLM", _text(**_DEC)),
    Family("stablelm", "decoder", "StableLmConfig", "StableLmForCausalLM", _text(**_DEC)),
    Family("codegen", "decoder", "CodeGenConfig", "CodeGenForCausalLM",
           dict(vocab_size=V, n_embd=H, n_layer=L, n_head=NH, rotary_dim=4, n_positions=64, n_ctx=64)),
    Family("gpt_bigcode", "decoder", "GPTBigCodeConfig", "GPTBigCodeForCausalLM",
           dict(vocab_size=V, n_embd=H, n_layer=L, n_head=NH, n_positions=64)),
    Family("mpt", "decoder", "MptConfig", "MptForCausalLM",
           dict(vocab_size=V, d_model=H, n_layers=L, n_heads=NH, max_seq_len=64)),
    Family("biogpt", "decoder", "BioGptConfig", "BioGptForCausalLM", _text()),
    Family("xglm", "decoder", "XGLMConfig", "XGLMForCausalLM",
           dict(vocab_size=V, d_model=H, num_layers=L, attention_heads=NH, ffn_dim=FF, max_position_embeddings=64)),
    # mixture of experts
    Family("mixtral", "moe", "MixtralConfig", "MixtralForCausalLM", _text(**_DEC, num_local_experts=4,
                                                                          num_experts_per_tok=2)),
    Family("qwen2_moe", "moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
           _text(**_DEC, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                 shared_expert_intermediate_size=32)),
    Family("olmoe", "moe", "OlmoeConfig", "OlmoeForCausalLM", _text(**_DEC, num_experts=4, num_experts_per_tok=2)),
    # encoders
    Family("bert", "encoder", "BertConfig", "BertModel", _text(**_ENC)),
    Family("roberta", "encoder", "RobertaConfig", "RobertaModel", _text(**_ENC, pad_token_id=1)),
    Family("xlm-roberta", "encoder", "XLMRobertaConfig", "XLMRobertaModel", _text(**_ENC, pad_token_id=1)),
    Family("distilbert", "encoder", "DistilBertConfig", "DistilBertModel",
           dict(vocab_size=V, dim=H, n_layers=L, n_heads=NH, hidden_dim=FF, max_position_embeddings=64),
           peft_type="distilbert"),
    Family("albert", "encoder", "AlbertConfig", "AlbertModel", _text(embedding_size=16)),
    Family("deberta", "encoder", "DebertaConfig", "DebertaModel", _text(**_ENC)),
    Family("deberta-v2", "encoder", "DebertaV2Config", "DebertaV2Model", _text(**_ENC)),
    Family("electra", "encoder", "ElectraConfig", "ElectraModel", _text(**_ENC, embedding_size=16)),
    Family("mpnet", "encoder", "MPNetConfig", "MPNetModel", _text()),
    Family("camembert", "encoder", "CamembertConfig", "CamembertModel", _text(**_ENC, pad_token_id=1)),
    Family("megatron-bert", "encoder", "MegatronBertConfig", "MegatronBertModel", _text(**_ENC)),
    Family("mobilebert", "encoder", "MobileBertConfig", "MobileBertModel",
           _text(embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16, num_feedforward_networks=1)),
    Family("layoutlm", "encoder", "LayoutLMConfig", "LayoutLMModel", _text(**_ENC)),
    # encoder-decoders
    Family("t5", "encdec", "T5Config", "T5Model", dict(vocab_size=V, d_model=H, d_kv=8, d_ff=FF, num_layers=L,
                                                        num_heads=NH), "encdec"),
    Family("mt5", "encdec", "MT5Config", "MT5Model", dict(vocab_size=V, d_model=H, d_kv=8, d_ff=FF, num_layers=L,
                                                           num_heads=NH), "encdec"),
    *[Family(n, "encdec", c, m, dict(vocab_size=V, d_model=H, encoder_layers=L, decoder_layers=L,
                                     encoder_attention_heads=NH, decoder_attention_heads=NH, encoder_ffn_dim=FF,
                                     decoder_ffn_dim=FF, max_position_embeddings=64, pad_token_id=1,
                                     decoder_start_token_id=1), "encdec")
      for n, c, m in (("bart", "BartConfig", "BartModel"), ("mbart", "MBartConfig", "MBartModel"),
                      ("pegasus", "PegasusConfig", "PegasusModel"), ("marian", "MarianConfig", "MarianModel"),
                      ("m2m_100", "M2M100Config", "M2M100Model"))],
    # vision
    Family("vit", "vision", "ViTConfig", "ViTModel", _VIT, "image"),
    Family("deit", "vision", "DeiTConfig", "DeiTModel", _VIT, "image"),
    Family("beit", "vision", "BeitConfig", "BeitModel", _VIT, "image"),
    Family("dinov2", "vision", "Dinov2Config", "Dinov2Model", _VIT, "image"),
    Family("swin", "vision", "SwinConfig", "SwinModel",
           dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4), "image"),
    Family("convnext", "vision", "ConvNextConfig", "ConvNextModel",
           dict(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, image_size=32, layer_scale_init_value=1.0), "image"),
    Family("resnet", "vision", "ResNetConfig", "ResNetModel",
           dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic"), "image",
           targets=["convolution"]),
    Family("siglip_vision_model", "vision", "SiglipVisionConfig", "SiglipVisionModel", _VIT, "image"),
    Family("clip_vision_model", "vision", "CLIPVisionConfig", "CLIPVisionModel", _VIT, "image"),
    Family("clip_text_model", "encoder", "CLIPTextConfig", "CLIPTextModel", _text()),
    # speech
    Family("whisper", "speech", "WhisperConfig", "WhisperModel",
           dict(vocab_size=V, d_model=H, encoder_layers=L, decoder_layers=L, encoder_attention_heads=NH,
                decoder_attention_heads=NH, encoder_ffn_dim=FF, decoder_ffn_dim=FF, num_mel_bins=16,
                max_source_positions=16, max_target_positions=32, pad_token_id=1, bos_token_id=1,
                eos_token_id=2, decoder_start_token_id=1), "whisper"),
    *[Family(n, "speech", c, m, dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=NH, intermediate_size=FF,
                                     conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4),
                                     num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4), "audio")
      for n, c, m in (("wav2vec2", "Wav2Vec2Config", "Wav2Vec2Model"), ("hubert", "HubertConfig", "HubertModel"),
                      ("wavlm", "WavLMConfig", "WavLMModel"))],
]


class Wrapped(nn.Module):
    """A transformers model called with positional tensors, returning its main output tensor."""

    def __init__(self, model: nn.Module, names: tuple[str, ...], extra: dict[str, Any]) -> None:
        super().__init__()
        self.model, self.names, self.extra = model, names, extra

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        out = self.model(**dict(zip(self.names, xs)), **self.extra)
        return out.logits if hasattr(out, "logits") else out[0]


def build(f: Family) -> tuple[Wrapped, tuple[torch.Tensor, ...]]:
    """The tiny model of ``f`` (seeded) and one batch of inputs."""
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, f.config)(**f.cfg)
    model = getattr(transformers, f.model)(config).eval()
    gen = torch.Generator().manual_seed(1)
    extra: dict[str, Any] = {"use_cache": False} if f.kind in ("decoder", "moe", "encdec", "speech") \
        and f.inputs != "audio" else {}
    if f.inputs == "text":
        return Wrapped(model, ("input_ids",), extra), (torch.randint(3, V, (2, 8), generator=gen),)
    dec = torch.randint(3, V, (2, 6), generator=gen)
    if f.inputs == "encdec":
        return Wrapped(model, ("input_ids", "decoder_input_ids"), extra), (torch.randint(3, V, (2, 8), generator=gen),
                                                                           dec)
    if f.inputs == "whisper":
        return Wrapped(model, ("input_features", "decoder_input_ids"), extra), (torch.randn(2, 16, 32, generator=gen),
                                                                                dec)
    if f.inputs == "audio":
        return Wrapped(model, ("input_values",), extra), (torch.randn(2, 400, generator=gen),)
    return Wrapped(model, ("pixel_values",), extra), (torch.randn(2, 3, 32, 32, generator=gen),)


def targets(f: Family, model: Wrapped) -> tuple[Any, list[str]]:
    """The family's own targets, else peft's default target modules for the model type, else
    ``"all-linear"`` without the output embedding (peft leaves it out of all-linear); and the
    excluded module names."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    names = f.targets or defaults.get(f.peft_type or f.name)
    if names:
        return list(names), []
    out = model.model.get_output_embeddings() if hasattr(model.model, "get_output_embeddings") else None
    exclude = [n for n, m in model.named_modules() if out is not None and m is out]
    return "all-linear", exclude


def _diff(a: Any, b: torch.Tensor) -> float:
    a = torch.as_tensor(a)
    return (a.float() - b.float()).abs().max().item() / max(1.0, b.abs().max().item())


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160] if text else ''}"


def _loss(f: Family) -> Any:
    if f.kind in ("decoder", "moe"):
        return "causal_lm"
    # not a mean square: that of a LayerNorm output is constant (no gradient)
    return lambda out: out.float().sin().mean()


def run_family(f: Family, folder: str) -> dict[str, Any]:
    """Every stage for one family: {stage: (ok, note)} plus compile seconds."""
    import graphpeft as gp

    row: dict[str, Any] = {"family": f.name, "kind": f.kind, "stages": {}, "seconds": {}}
    stages = row["stages"]

    def stage(name: str, fn: Callable[[], str]) -> bool:
        try:
            note = fn()
            stages[name] = {"ok": True, "note": note}
        except Exception as e:  # noqa: BLE001 - a stage that crashes fails with its reason
            log.debug("%s %s", f.name, name, exc_info=True)
            stages[name] = {"ok": False, "note": _short(e)}
        return stages[name]["ok"]

    model, xs = build(f)
    tgt, exclude = targets(f, model)
    row["targets"] = tgt if isinstance(tgt, str) else ",".join(tgt)
    with torch.no_grad():
        want = model(*xs)
    box: dict[str, Any] = {}

    def do_compile() -> str:
        t = time.perf_counter()
        box["cm"] = gp.compile(model, gp.Plan([gp.LoRA(targets=tgt, exclude=exclude or None, r=4, alpha=8,
                                                        init="random")]), xs)
        row["seconds"]["compile"] = round(time.perf_counter() - t, 2)
        return f"{len(box['cm'].adapters())} layers"

    if not stage("compile", do_compile):
        return row
    cm = box["cm"]
    with torch.no_grad():
        got = cm(*xs)

    def do_peft() -> str:
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

        pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=tgt,
                                                             exclude_modules=exclude or None))
        res = set_peft_model_state_dict(pm, {"base_model.model." + k: v for k, v in cm.adapter_state_dict().items()})
        if res.unexpected_keys:
            raise AssertionError(f"peft has no {res.unexpected_keys[0]}")
        with torch.no_grad():
            theirs = pm.eval()(*xs)
        d = _diff(got, theirs)
        if d > ATOL or _diff(got, want) < 1e-6:
            raise AssertionError(f"differs from peft by {d:.2g}" if d > ATOL else "the adapters change nothing")
        return f"{d:.1g}"

    def do_merge() -> str:
        box["merged"] = cm.merge()
        with torch.no_grad():
            d = _diff(box["merged"](*xs), got)
        if d > ATOL:
            raise AssertionError(f"merged differs by {d:.2g}")
        return f"{d:.1g}"

    def do_onnx() -> str:
        from graphpeft.backends.onnx import OnnxRunner

        path = os.path.join(folder, f"{f.name}.onnx")
        cm.export_onnx(path, merged=True)
        d = _diff(OnnxRunner(path).run(cm.flat_inputs(*xs))[0], got)
        if d > ATOL:
            raise AssertionError(f"onnxruntime differs by {d:.2g}")
        return f"{d:.1g}"

    def do_train() -> str:
        saved = {k: v.clone() for k, v in cm.adapter_state_dict().items()}
        t = time.perf_counter()
        box["step"] = step = cm.compile_training(_loss(f), gp.optim.SGD(lr=0.1), example_batch=xs)
        row["seconds"]["train_compile"] = round(time.perf_counter() - t, 2)
        box["saved"] = saved
        loss = float(step(*xs))
        moved = sum(not torch.equal(saved[k], v) for k, v in cm.adapter_state_dict().items())
        if not (loss == loss) or not moved:
            raise AssertionError(f"loss {loss}, {moved} adapters moved")
        return f"loss {loss:.3g}"

    def do_train_ort() -> str:
        from graphpeft.backends.onnx import OnnxTrainer

        step, saved = box["step"], box["saved"]
        cm.load_adapter_state_dict(saved)
        path = os.path.join(folder, f"{f.name}.train.onnx")
        step.export_onnx(path)
        trainer = OnnxTrainer(path)
        ours = [float(step(*xs)) for _ in range(2)]
        theirs = [float(trainer.step(*xs)) for _ in range(2)]
        d = max(abs(a - b) / max(1.0, abs(a)) for a, b in zip(ours, theirs))
        a, b = cm.adapter_state_dict(), trainer.adapter_state_dict()
        dp = max(_diff(b[k], a[k]) for k in a)
        if d > ATOL or dp > ATOL:
            raise AssertionError(f"onnxruntime step differs: loss {d:.2g}, adapters {dp:.2g}")
        return f"loss {d:.1g}, adapters {dp:.1g}"

    for name, fn in (("peft", do_peft), ("merge", do_merge)):
        stage(name, fn)
    if stages["merge"]["ok"]:
        stage("onnx", do_onnx)
    if stage("train", do_train):
        stage("train_ort", do_train_ort)
    return row


def run(families: list[Family], on_row: Optional[Callable[[list[dict[str, Any]]], None]] = None
        ) -> list[dict[str, Any]]:
    """Run each family in turn; ``on_row(rows)`` after each (to save as it goes)."""
    rows = []
    for f in families:
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                row = run_family(f, d)
            except Exception as e:  # noqa: BLE001 - a model that does not build is a failed compile
                row = {"family": f.name, "kind": f.kind, "stages": {"compile": {"ok": False, "note": _short(e)}},
                       "seconds": {}}
        row["seconds"]["total"] = round(time.perf_counter() - t, 1)
        rows.append(row)
        marks = " ".join(f"{s}:{'ok' if row['stages'].get(s, {}).get('ok') else '--'}" for s in STAGES)
        fails = "; ".join(f"{s}: {v['note']}" for s, v in row["stages"].items() if not v["ok"])
        print(f"{f.name:22s} {marks}  compile {row['seconds'].get('compile', '-')} s  {fails}", flush=True)
        if on_row is not None:
            on_row(rows)
    return rows


def compile_times(families: list[Family]) -> list[dict[str, Any]]:
    """``gp.compile`` seconds per family (LoRA as in the full run), after one warm-up compile."""
    import graphpeft as gp

    rows = []
    for i, f in enumerate([families[0]] + families):
        model, xs = build(f)
        tgt, exclude = targets(f, model)
        plan = gp.Plan([gp.LoRA(targets=tgt, exclude=exclude or None, r=4, alpha=8, init="random")])
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gp.compile(model, plan, xs)
        if i:  # the first compile pays the imports and torch's first-trace caches
            rows.append({"family": f.name, "kind": f.kind, "compile_s": round(time.perf_counter() - t, 2)})
            print(f"{f.name:22s} compile {rows[-1]['compile_s']} s", flush=True)
    return rows


def counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Families passing each stage, and end to end."""
    out = {s: sum(bool(r["stages"].get(s, {}).get("ok")) for r in rows) for s in STAGES}
    out["all"] = sum(all(r["stages"].get(s, {}).get("ok") for s in STAGES) for r in rows)
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    c = counts(rows)
    lines = [f"{len(rows)} families; passing per stage: " + ", ".join(f"{s} {c[s]}" for s in STAGES)
             + f"; end to end {c['all']}.", "",
             "| family | kind | " + " | ".join(STAGES) + " | compile s | step compile s | failures |",
             "|---|---|" + "---|" * len(STAGES) + "---|---|---|"]
    for r in rows:
        marks = " | ".join("ok" if r["stages"].get(s, {}).get("ok") else
                           ("FAIL" if s in r["stages"] else "-") for s in STAGES)
        fails = "; ".join(f"{s}: {v['note']}" for s, v in r["stages"].items() if not v["ok"]).replace("|", "/")
        lines.append(f"| {r['family']} | {r['kind']} | {marks} | {r['seconds'].get('compile', '-')} | "
                     f"{r['seconds'].get('train_compile', '-')} | {fails} |")
    return "\n".join(lines) + "\n"


def _merge_with_saved(rows: list[dict[str, Any]], path: str) -> list[dict[str, Any]]:
    """The saved table with these rows replacing (or adding) theirs, in the order of FAMILIES."""
    by_name = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            by_name = {r["family"]: r for r in json.load(fh)["rows"]}
    by_name.update({r["family"]: r for r in rows})
    order = {f.name: i for i, f in enumerate(FAMILIES)}
    return sorted((r for n, r in by_name.items() if n in order), key=lambda r: order[r["family"]])


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", help="family names (model types)")
    parser.add_argument("--kind", help="one kind: decoder, moe, encoder, encdec, vision, speech")
    parser.add_argument("--compile-times", action="store_true",
                        help="only time gp.compile per family (run on an idle machine); "
                             "writes results/families_compile.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import transformers

    transformers.logging.set_verbosity_error()
    chosen = [f for f in FAMILIES if (not args.only or f.name in args.only) and (not args.kind or f.kind == args.kind)]
    if not chosen:
        parser.error(f"no family matches; known: {', '.join(f.name for f in FAMILIES)}")
    if args.compile_times:
        return _save_compile_times(compile_times(chosen))
    rows = run(chosen, save)
    c = counts(rows)
    print(f"\n{len(rows)} families: " + ", ".join(f"{s} {c[s]}" for s in STAGES) + f", end to end {c['all']}")
    return 0


def _save_compile_times(rows: list[dict[str, Any]]) -> int:
    from graphpeft.paths import atomic_write

    slow = [r for r in rows if r["compile_s"] > 10]
    summary = {"families": len(rows), "max_s": max(r["compile_s"] for r in rows),
               "median_s": sorted(r["compile_s"] for r in rows)[len(rows) // 2], "over_10s": len(slow)}
    os.makedirs(RESULTS, exist_ok=True)
    atomic_write(os.path.join(RESULTS, "families_compile.json"),
                 json.dumps({"summary": summary, "rows": rows}, indent=1).encode())
    print(f"\n{summary}")
    return 0


def save(rows: list[dict[str, Any]]) -> None:
    """Write these rows into the saved table (json and markdown), replacing theirs."""
    from graphpeft.paths import atomic_write

    os.makedirs(RESULTS, exist_ok=True)
    rows = _merge_with_saved(rows, os.path.join(RESULTS, "families.json"))
    atomic_write(os.path.join(RESULTS, "families.json"),
                 json.dumps({"counts": counts(rows), "rows": rows}, indent=1).encode())
    atomic_write(os.path.join(RESULTS, "families.md"), markdown(rows).encode())


if __name__ == "__main__":
    raise SystemExit(main())
