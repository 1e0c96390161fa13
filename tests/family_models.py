"""Tiny random models of every decoder family llmq covers, built from transformers configs offline.

Two decoder layers, widths 80 (hidden) and 144 (MLP) that are multiples of no tile size (64, 256)
and of no common group size but 16, a 400-token BPE vocabulary trained on Austen, and the features that must survive
quantization turned on where a family has them: biases, tied embeddings, q/k norms, sliding
windows, soft-capped attention and logits, embedding scaling, fused projections, experts.
Shared by tests/test_families.py and scripts/family_matrix.py (docs/models.md).
"""

from __future__ import annotations

from pathlib import Path

import torch

HIDDEN, INTERMEDIATE, LAYERS, HEADS = 80, 144, 2, 4
_ATTENTION = {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS}
_LLAMA_LIKE = {**_ATTENTION, "intermediate_size": INTERMEDIATE, "num_key_value_heads": 2}
_MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 48}

# family label -> (config class name, config arguments, what the family exercises); MATRICES below
# counts by hand what each quantizes: per layer q, k, v, o and gate, up, down for the Llama-like.
FAMILIES: dict[str, tuple[str, dict, str]] = {
    "Llama 3": ("LlamaConfig", {**_LLAMA_LIKE, "rope_theta": 500000.0}, "GQA, RoPE"),
    "Mistral": ("MistralConfig", {**_LLAMA_LIKE, "sliding_window": 32}, "sliding-window attention"),
    "Qwen 2.5": ("Qwen2Config", {**_LLAMA_LIKE, "tie_word_embeddings": True}, "q/k/v biases, tied embeddings"),
    "Qwen 3": ("Qwen3Config", {**_LLAMA_LIKE, "head_dim": 24}, "q/k norms, head_dim ≠ hidden/heads"),
    "Gemma 2": (
        "Gemma2Config",
        {
            **_LLAMA_LIKE,
            "head_dim": 24,
            "sliding_window": 32,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
        },
        "soft-capped attention and logits, embedding scaling, sliding window, tied",
    ),  # fmt: skip
    "Gemma 3": (
        "Gemma3TextConfig",
        {**_LLAMA_LIKE, "head_dim": 24, "sliding_window": 32},
        "q/k norms, embedding scaling, local/global layers",
    ),  # fmt: skip
    "Phi-3/4": ("Phi3Config", {**_LLAMA_LIKE, "pad_token_id": 0}, "fused qkv_proj and gate_up_proj"),
    "OLMo": ("OlmoConfig", _LLAMA_LIKE, "non-parametric layer norm"),
    "OLMo 2": ("Olmo2Config", _LLAMA_LIKE, "q/k norms, post-norms"),
    "GPT-NeoX / Pythia": (
        "GPTNeoXConfig",
        {**_ATTENTION, "intermediate_size": INTERMEDIATE},
        "fused query_key_value with biases, checkpoint's embed_out is lm_head",
    ),  # fmt: skip
    "Falcon": (
        "FalconConfig",
        {**_ATTENTION, "new_decoder_architecture": False, "multi_query": True, "bias": True},
        "fused multi-query query_key_value, transformer.h, tied",
    ),  # fmt: skip
    "OPT": (
        "OPTConfig",
        {**_ATTENTION, "ffn_dim": INTERMEDIATE, "word_embed_proj_dim": HIDDEN},
        "model.decoder.layers, biases, learned positions, tied",
    ),  # fmt: skip
    "GPT-2": (
        "GPT2Config",
        {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "n_inner": INTERMEDIATE},
        "Conv1D (weights stored [in, out]), fused c_attn, tied",
    ),  # fmt: skip
    "Mixtral": (
        "MixtralConfig",
        {**_LLAMA_LIKE, "num_local_experts": 4, "num_experts_per_tok": 2},
        "4 experts in 3-D tensors, checkpoint per expert (block_sparse_moe.experts.e.w1/w2/w3)",
    ),  # fmt: skip
    "Qwen 2 MoE": (
        "Qwen2MoeConfig",
        {**_LLAMA_LIKE, **_MOE, "num_experts": 4, "shared_expert_intermediate_size": 96},
        "4 experts + shared expert, its 16-bit gate",
    ),  # fmt: skip
    "Qwen 3 MoE": (
        "Qwen3MoeConfig",
        {**_LLAMA_LIKE, **_MOE, "num_experts": 4, "head_dim": 24},
        "4 experts, q/k norms",
    ),  # fmt: skip
}
# Quantized matrices per family, counted from the architectures (2 layers): Llama-like 2 x 7; fused
# qkv + o + fused gate_up + down 2 x 4; OPT 2 x (q, k, v, out, fc1, fc2); MoE 2 x (4 attention +
# 4 experts x 2 matrices), Qwen 2 MoE + 3 shared-expert Linears per layer (its gate stays 16-bit).
MATRICES = {"Phi-3/4": 8, "GPT-NeoX / Pythia": 8, "Falcon": 8, "GPT-2": 8, "OPT": 12, "Mixtral": 24,
            "Qwen 2 MoE": 30, "Qwen 3 MoE": 24}  # fmt: skip
CONTEXT = 128
INIT_RANGE = 0.1


def build(label: str, folder: Path, tokenizer, seed: int = 0) -> Path:
    """Save the tiny ``label`` model and ``tokenizer`` into ``folder`` (safetensors, config, tokenizer)."""
    import transformers

    class_name, arguments, _ = FAMILIES[label]
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    positions = {"n_positions": CONTEXT} if class_name == "GPT2Config" else {"max_position_embeddings": CONTEXT}
    # Weights ten times the usual random scale, so the layers, not the embeddings alone, decide the
    # logits: with 0.02 a random 2-layer model's output barely depends on what the layers compute.
    scale = {"initializer_range": INIT_RANGE}
    config = getattr(transformers, class_name)(vocab_size=len(tokenizer), **positions, **special, **scale, **arguments)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # real checkpoints' norms are not all ones and biases not all zeros
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def reference_logits(folder: Path, artifact: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the source model run by transformers itself, every tensor replaced by the artifact's:
    dense ones as stored, quantized ones decoded by the exact reference (``layout.dequantize``) and
    put where the model keeps them (a Linear's weight, a Conv1D's transposed, one expert's slice)."""
    import transformers

    from llmq.runtime.format import artifact as A
    from llmq.runtime.format.layout import dequantize

    manifest = A.open_artifact(artifact)
    tensors = A.load_tensors(manifest)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param, expert, transposed in _slots(model, manifest):
            layout = manifest.linears[name].layout
            weight = dequantize({s: tensors[f"{name}.{s}"] for s in layout.tensor_specs()}, layout)
            (param if expert is None else param[expert]).copy_(weight.T if transposed else weight)
        params = dict(model.named_parameters(remove_duplicate=False))
        for name in manifest.dense:
            params[name].copy_(tensors[name].float())
        return model(ids).logits


def _slots(model, manifest):
    """(parameter, index or None, transposed) where each quantized matrix of ``manifest`` lives in ``model``."""
    from llmq.runtime.sources.families import is_conv1d

    params = dict(model.named_parameters(remove_duplicate=False))
    for name in manifest.linears:
        if f"{name}.weight" in params:
            yield name, params[f"{name}.weight"], None, is_conv1d(model.get_submodule(name))
        else:
            fused, _, expert = name.rpartition(".")
            yield name, params[fused], int(expert), False


def noisy_logits(folder: Path, artifact: Path, ids: torch.Tensor, relative: float, seed: int = 0) -> torch.Tensor:
    """Logits of the source model with each matrix the artifact quantizes perturbed by Gaussian noise of
    ``relative`` times its RMS: what rounding errors of that size would do if they were independent."""
    import transformers

    from llmq.runtime.format import artifact as A

    manifest = A.open_artifact(artifact, verify=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param, expert, _ in _slots(model, manifest):
            target = param if expert is None else param[expert]
            rms = target.pow(2).mean().sqrt()
            target.add_(torch.randn(target.shape, generator=gen) * relative * rms)
        return model(ids).logits


# Relative RMS error of rounding a Gaussian weight to 4 bits with a group's min/max range, groups of
# 16: E[range of 16 samples] / 15 levels / sqrt(12) = 3.53 sigma / 15 / 3.46 = 0.068 sigma.
FOUR_BIT_ERROR = 0.068
# 4-bit logits may differ from the source by at most this many times what independent noise of
# FOUR_BIT_ERROR does. Measured over every family: 0.86-1.11 (docs/models.md); one noise draw
# varies by about +-10%, and a quantizer whose errors were 1.5x what 4 bits give would fail.
FOUR_BIT_MARGIN = 1.5
PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune must be"


def check_family(label: str, work: Path, tokenizer, cli) -> dict:
    """Every step of the coverage matrix for ``label``; ``cli(*args)`` runs ``llmq ARGS`` and returns
    (exit code, stdout, stderr). Raises AssertionError at the first step that fails."""
    import json

    import transformers

    import llmq

    folder = build(label, work / "model", tokenizer)

    def run(*args) -> dict | None:
        code, out, err = cli(*args)
        assert code == 0, f"llmq {' '.join(args)} exited {code}: {err.strip().splitlines()[-1:]}"
        return json.loads(out) if "--json" in args else None

    small = ("--g4", "16", "-q", "--json")
    rtn = run("quantize", str(folder), "-o", str(work / "rtn.llmq"), "--no-calib", *small)
    calib = ("--calib-data", "austen", "--samples", "4", "--calib-seq-len", "64")
    refine = ("--refine", "block", "--refine-steps", "2", "--refine-batch", "2")
    gptq = run("quantize", str(folder), "-o", str(work / "gptq.llmq"), *calib, *refine, *small)
    four = run("quantize", str(folder), "-o", str(work / "4bit.llmq"), "--preset", "4bit", "--no-calib", *small)
    for artifact in ("rtn", "gptq", "4bit"):
        run("verify", str(work / f"{artifact}.llmq"), "-q")
    ppl = run("eval", "ppl", str(work / "gptq.llmq"), "--dataset", "austen", "--seq-len", "64", "--max-tokens", "256",
              "--json", "-q")["result"]["ppl"]  # fmt: skip
    text = run("generate", str(work / "gptq.llmq"), "-p", "It is a truth", "-n", "8", "--json", "-q")
    assert text["new_tokens"] >= 1
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        source = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(ids).logits
        quantized = {name: llmq.load(work / f"{name}.llmq")(ids).logits for name in ("rtn", "gptq", "4bit")}
    exact = max(float((quantized[n] - reference_logits(folder, work / f"{n}.llmq", ids)).abs().max())
                for n in ("rtn", "gptq"))  # fmt: skip
    assert exact <= ORDER_ROUNDING and all(torch.isfinite(q).all() for q in quantized.values()), f"off by {exact}"
    assert max(source_errors(folder, work / "4bit.llmq").values()) < SOURCE_ERROR_4BIT
    error4 = float((quantized["4bit"] - source).norm() / source.norm())
    noise = float((noisy_logits(folder, work / "4bit.llmq", ids, FOUR_BIT_ERROR) - source).norm() / source.norm())
    assert error4 <= FOUR_BIT_MARGIN * noise, f"4-bit logits off by {error4:.3f}, noise of 4 bits gives {noise:.3f}"
    return {
        "family": label,
        "model_type": json.loads((folder / "config.json").read_text())["model_type"],
        "exercises": FAMILIES[label][2],
        "linears": len(rtn["accounting"]["layers"]),
        "expected_linears": MATRICES.get(label, 14),
        "bpw_rtn": rtn["accounting"]["bits_per_weight"],
        "bpw_gptq": gptq["accounting"]["bits_per_weight"],
        "bpw_4bit": four["accounting"]["bits_per_weight"],
        "ppl_gptq": ppl,
        "logits_4bit_vs_noise": round(error4 / noise, 2),
    }


# llmq's runtime and transformers' own modules may order the same float32 sums differently
# (Falcon's Linear adds its bias after the product where F.linear fuses it; experts are dispatched
# apart), and some CPUs' BLAS then round differently: logits were bit-equal on an Intel Xeon and
# up to 1.2e-6 apart on an AMD EPYC. A wrong decode moves them by orders of magnitude more.
ORDER_ROUNDING = 1e-5  # the largest |logit difference| allowed, for logits of order 1

# Each 4-bit matrix decodes to its source matrix within this relative RMS error: 0.068 expected
# (FOUR_BIT_ERROR), while the wrong matrix (a gate/up swap, a missing transpose, another expert)
# differs by about sqrt(2) = 1.41 between independent random matrices.
SOURCE_ERROR_4BIT = 0.2


def source_errors(folder: Path, artifact: Path) -> dict[str, float]:
    """Quantized matrix name -> relative RMS error of its decoded weight against the source model's
    matrix at the place the artifact says it comes from."""
    import transformers

    from llmq.runtime.format import artifact as A
    from llmq.runtime.format.layout import dequantize

    manifest = A.open_artifact(artifact)
    tensors = A.load_tensors(manifest)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    errors = {}
    for name, param, expert, transposed in _slots(model, manifest):
        layout = manifest.linears[name].layout
        weight = dequantize({s: tensors[f"{name}.{s}"] for s in layout.tensor_specs()}, layout)
        source = (param if expert is None else param[expert]).detach()
        source = source.T if transposed else source
        errors[name] = float((weight - source).norm() / source.norm())
    return errors
