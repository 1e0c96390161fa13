"""The ``llmq`` command line. ``main`` is the console-script entry point."""

from llmq.cli.app import main

__all__ = ["main"]
