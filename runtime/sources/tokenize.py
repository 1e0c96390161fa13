"""Text to token ids, the one way every command does it: whole texts for evaluation and calibration,
prompts (plain or through the chat template) for generation."""

from __future__ import annotations

import torch

from llmq.errors import ModelSourceError, UsageError


def tokenize_stream(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D token tensor, with the tokenizer's default special tokens."""
    ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def bos_policy(tokenizer, ids: torch.Tensor) -> str:
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) and int(ids[0]) == bos:
        return f"one BOS ({tokenizer.bos_token!r}) at the start of the text, as the tokenizer adds it; none per window"
    return "no BOS: the tokenizer adds none by default, and none is inserted per window"


def check_prompt(prompt: str, chat: bool, system: str | None) -> None:
    if not prompt:
        raise UsageError("the prompt is empty; pass text with --prompt")
    if system is not None and not chat:
        raise UsageError("--system only applies with --chat")


def encode_prompt(tokenizer, prompt: str, chat: bool, system: str | None = None) -> torch.Tensor:
    """Prompt token ids, shape [1, T]; with ``chat`` through the tokenizer's chat template."""
    check_prompt(prompt, chat, system)
    if not chat:
        return torch.tensor([tokenizer(prompt, add_special_tokens=True)["input_ids"]], dtype=torch.long)
    if not getattr(tokenizer, "chat_template", None):
        raise ModelSourceError(
            "this model's tokenizer has no chat template; drop --chat to use the prompt as plain text"
        )
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    return torch.tensor([encoded["input_ids"]], dtype=torch.long)
