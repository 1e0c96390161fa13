"""Memory stays flat across a long evaluation in one process (slow: the demo model's 49k vocab).

Before the fix, keeping a small per-window tensor pinned the freed logits buffers in the C heap
and the process grew by about 5 MB per window (1.1 GB over 200 windows).
"""

from __future__ import annotations

import pytest
import torch

from llmq.runtime.eval import perplexity
from llmq.runtime.loader import load_model
from llmq.runtime.sources import demo, models, text, tokenize
from llmq.runtime.sources.memory import current_rss_bytes

pytestmark = pytest.mark.slow


def test_perplexity_over_many_windows_does_not_grow(demo_cache, monkeypatch):
    monkeypatch.setenv("LLMQ_CACHE_DIR", str(demo_cache))
    demo.ensure_demo_model(progress=False)
    source = models.resolve_model("demo", progress=False)
    lm = load_model(source, models.load_config(source), torch.device("cpu"), torch.float32)
    ids = tokenize.tokenize_stream(
        models.load_tokenizer(source), text.load_text(text.Dataset.austen, None, text.Split.eval).text
    )[: 64 * 60]
    rss = []
    perplexity.perplexity(lm, ids, 64, 64, on_window=lambda done, total: rss.append(current_rss_bytes()))
    assert len(rss) == 60
    growth = rss[-1] - rss[9]
    assert growth < 40e6, f"RSS grew {growth / 1e6:.0f} MB over 50 windows"
