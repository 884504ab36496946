"""Generation progress on stderr: one bar per model with probes done and tokens per second.

Shown only when asked for and stderr is a terminal, so CI logs and captured output
stay clean. Counting (probes, tokens, cache hits) happens either way: the screening
logs it once per model when the model is done.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any, TextIO

from pytest_quantsafe.types import Completion


def wants_bar(enabled: bool, stream: TextIO | None = None) -> bool:
    """Return True when a progress bar should be drawn on ``stream`` (default stderr)."""
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    return bool(enabled and callable(isatty) and isatty())


class GenerationProgress:
    """Counts one model's completions; draws a tqdm bar with tokens/s when enabled."""

    def __init__(self, label: str, total: int, *, cached: int = 0, enabled: bool = True) -> None:
        self.label = label
        self.total = total
        self.cached = cached
        self.generated = 0
        self.tokens = 0
        self._start = time.monotonic()
        self._bar: Any = None
        if wants_bar(enabled) and total > 0:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=cached, desc=label, unit="probe", file=sys.stderr,
                             dynamic_ncols=True, leave=True)

    @property
    def elapsed(self) -> float:
        """Return the seconds since this model's generation started."""
        return time.monotonic() - self._start

    @property
    def tokens_per_second(self) -> float:
        """Return generated tokens per wall-clock second so far (0 before the first)."""
        elapsed = self.elapsed
        return self.tokens / elapsed if elapsed > 0 else 0.0

    def update(self, completion: Completion) -> None:
        """Count one newly generated completion and refresh the bar."""
        self.generated += 1
        self.tokens += completion.n_tokens
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self.tokens_per_second:.1f} tok/s", refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        """Finish the bar (if any)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def summary(self) -> str:
        """Return one line: how many completions came from the cache, how many were generated, how fast."""
        return (f"{self.label}: {self.total} probes, {self.cached} from cache, {self.generated} generated "
                f"({self.tokens} tokens in {self.elapsed:.1f} s, {self.tokens_per_second:.1f} tok/s)")

    def __enter__(self) -> GenerationProgress:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
