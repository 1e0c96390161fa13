"""The ``llmq`` command line. ``main`` is the console-script entry point."""


def main() -> None:
    """The ``llmq`` script and ``python -m llmq.cli``: set this process's allocator, then run the app.

    The allocator is set here and not in :func:`llmq.cli.app.main`, which programs and tests may
    call inside their own process: only a process that is ``llmq`` gets it.
    """
    from llmq.cli.allocator import fault_in_huge_pages, return_large_blocks
    from llmq.cli.app import main as run

    return_large_blocks()
    fault_in_huge_pages()
    run()


__all__ = ["main"]
