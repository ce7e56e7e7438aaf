"""Progress reporting that suits where stderr goes: a live bar on a terminal, plain lines in a log.

A tqdm bar redraws itself with carriage returns; sent to a file or a CI log those frames pile up
into one unreadable line. So the bar is drawn only when the stream is a terminal. Elsewhere a
plain line is written when the count crosses a tenth of the total, at most one line per
``interval_s`` seconds, which keeps short loops silent and tells a long run's log where it is.
"""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO

#: Fewest seconds between two plain progress lines (short loops write none at all).
LINE_INTERVAL_S = 30.0


class Progress:
    """Counts steps of a loop of known length and reports them to ``stream`` (stderr by default)."""

    def __init__(self, total: int, desc: str, stream: TextIO | None = None, leave: bool = True,
                 interval_s: float = LINE_INTERVAL_S, unit: str = "it") -> None:
        self.total, self.desc, self.count = total, desc, 0
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s = interval_s
        self._postfix: dict[str, Any] = {}
        self._tenths = 0
        self._last_line = time.monotonic()
        self._bar: Any = None
        if _is_terminal(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, file=self.stream, leave=leave, dynamic_ncols=True, unit=unit)

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advance by ``n``; ``postfix`` values (loss, rate, ...) are shown with the count."""
        self.count += n
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(n)
            return
        self._postfix.update(postfix)
        tenths = 10 * self.count // max(1, self.total)
        now = time.monotonic()
        if tenths > self._tenths and now - self._last_line >= self.interval_s:
            self._tenths, self._last_line = tenths, now
            extra = "".join(f" {k} {v}" for k, v in self._postfix.items())
            print(f"{self.desc}: {self.count}/{self.total} ({100 * self.count // max(1, self.total)}%){extra}",
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def progress(total: int, desc: str, enabled: bool, leave: bool = True, unit: str = "it") -> Progress | None:
    """A :class:`Progress` on stderr, or None when ``enabled`` is False (``--no-progress``)."""
    return Progress(total, desc, leave=leave, unit=unit) if enabled else None


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False
