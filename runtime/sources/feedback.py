"""How the library talks to its caller while it works: log lines, warnings, progress, stop requests.

Every public API call takes a :class:`Feedback`. The default one sends log lines and warnings to
the ``llmq`` logger and draws nothing; the CLI gives one that writes to stderr, draws progress
bars on a terminal and stops at the next layer, window or token when a signal asks it to.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

log = logging.getLogger("llmq")

# update(done, total), called as a unit of work completes
ProgressUpdate = Callable[[int, int], None]


def _no_progress(description: str) -> AbstractContextManager[ProgressUpdate]:
    return contextlib.nullcontext(lambda done, total: None)


def _never_stop() -> None:
    return None


@dataclass(frozen=True)
class Feedback:
    """``info``: one log line; ``warn``: something to act on (shown even when quiet);
    ``progress(description)``: a context manager yielding ``update(done, total)``;
    ``show_progress``: whether libraries may draw their own bars (downloads, conversions);
    ``stop()``: called at each bounded step, raises ``KeyboardInterrupt`` to end the run there."""

    info: Callable[[str], None] = log.info
    warn: Callable[[str], None] = log.warning
    progress: Callable[[str], AbstractContextManager[ProgressUpdate]] = _no_progress
    show_progress: bool = False
    stop: Callable[[], None] = _never_stop


LOGGED = Feedback()  # the default of every API call: the "llmq" logger, no bars
SILENT = Feedback(info=lambda message: None, warn=lambda message: None)
