"""How the library talks to its caller while it works: log lines, warnings, progress, stop requests.

Every public API call takes a :class:`Feedback`. The default one sends log lines and warnings to
the ``llmq`` logger and draws nothing. The CLI gives one that writes to stderr, draws progress
bars on a terminal, and turns Ctrl-C or SIGTERM into a stop at the next bounded step inside the
regions where the library checks for one (a tensor or a block in quantize, a layer in calibrate,
a window in eval, a token in generate, a timed round in profile, a shard in verify).
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
# check(), called at each bounded step of a stoppable region; raises KeyboardInterrupt to stop there
StopCheck = Callable[[], None]
# stage(name, seconds), called as a stage of a long run (calibration, GPTQ, refinement) finishes
StageDone = Callable[[str, float], None]


def _no_progress(description: str) -> AbstractContextManager[ProgressUpdate]:
    return contextlib.nullcontext(lambda done, total: None)


def _never_stop() -> AbstractContextManager[StopCheck]:
    return contextlib.nullcontext(lambda: None)


@dataclass(frozen=True)
class Feedback:
    """``info``: one log line; ``warn``: something to act on (shown even when quiet);
    ``progress(description)``: a context manager yielding ``update(done, total)``;
    ``show_progress``: whether libraries may draw their own bars (downloads, conversions);
    ``stoppable()``: a context manager around work that checks for a stop at each bounded step,
    yielding that check. Outside such regions an interrupt acts at once, as usual.
    ``stage(name, seconds)``: a stage of a long run finished, after that many wall seconds."""

    info: Callable[[str], None] = log.info
    warn: Callable[[str], None] = log.warning
    progress: Callable[[str], AbstractContextManager[ProgressUpdate]] = _no_progress
    show_progress: bool = False
    stoppable: Callable[[], AbstractContextManager[StopCheck]] = _never_stop
    stage: StageDone = lambda name, seconds: None

    @contextlib.contextmanager
    def steps(self, description: str):
        """A progress bar and a stoppable region together: yields ``step(done, total)``, which
        reports progress and then checks for a stop, for loops whose units are bounded steps."""
        with self.progress(description) as update, self.stoppable() as check:

            def step(done: int, total: int) -> None:
                update(done, total)
                check()

            yield step


LOGGED = Feedback()  # the default of every API call: the "llmq" logger, no bars
