"""Progress for long work: a tqdm bar on a terminal, a few readable lines in a log file or CI.

A redrawn bar written to a file is one endless line of carriage returns (a 250-step fit made 40 KB
of them). When stderr is not a terminal, `progress` prints a start line, a line each time another
quarter of the work is done or `every_s` seconds have passed (whichever comes later), and an end
line with the elapsed time and rate. `PAIRFREE_PROGRESS=bar|lines|off` overrides the choice.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO


class LineProgress:
    """The tqdm subset pairfree uses (update, set_postfix, close, context manager), as log lines."""

    def __init__(self, total: int, desc: str = "", unit: str = "it", initial: int = 0, every_s: float = 60.0,
                 stream: TextIO | None = None):
        self.total, self.desc, self.unit, self.n = int(total), desc, unit, int(initial)
        self.every_s, self.stream = every_s, stream or sys.stderr
        self.t0 = self.last_t = time.perf_counter()
        self.last_quarter = self._quarter()
        self.postfix = ""
        self.closed = False
        start = f" from {self.n}" if self.n else ""
        self._say(f"{self.desc}: started, {self.total} {self.unit}{start}")

    def _quarter(self) -> int:
        return 4 * self.n // self.total if self.total else 4

    def _say(self, msg: str) -> None:
        print(msg, file=self.stream, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        now, quarter = time.perf_counter(), self._quarter()
        if self.n < self.total and (quarter > self.last_quarter or now - self.last_t >= self.every_s):
            if now - self.last_t >= 1.0:  # at most a line a second, however small the steps
                pct = 100 * self.n / self.total if self.total else 100
                self._say(f"{self.desc}: {self.n}/{self.total} {self.unit} ({pct:.0f} %), "
                          f"{now - self.t0:.1f} s{self.postfix}")
                self.last_t, self.last_quarter = now, quarter

    def set_postfix(self, **kw: Any) -> None:
        self.postfix = "  " + " ".join(f"{k}={v}" for k, v in kw.items()) if kw else ""

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        dt = time.perf_counter() - self.t0
        rate = f", {self.n / dt:.1f} {self.unit}/s" if dt > 0 and self.n else ""
        self._say(f"{self.desc}: done, {self.n}/{self.total} {self.unit} in {dt:.1f} s{rate}{self.postfix}")

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Silent:
    n = 0

    def update(self, n: int = 1) -> None: ...

    def set_postfix(self, **kw: Any) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> "_Silent":
        return self

    def __exit__(self, *exc: Any) -> None: ...


def progress(total: int, desc: str, enabled: bool = True, unit: str = "it", initial: int = 0, leave: bool = False):
    """A progress reporter for `total` units of work: tqdm on a terminal, lines otherwise, or nothing."""
    mode = os.environ.get("PAIRFREE_PROGRESS", "").lower()
    if not enabled or mode == "off":
        return _Silent()
    if mode == "lines" or (mode != "bar" and not sys.stderr.isatty()):
        return LineProgress(total, desc, unit, initial)
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, dynamic_ncols=True)
