"""``python -m llmq.cli``: the same as the ``llmq`` console script."""

from llmq.cli import main

main()
