"""What the suite's steps print while they work: the `distillery` logger and the progress of long loops.

    from components.console import Progress, log
    log.info("train: resuming from %s", path)
    bar = Progress(1000, "train base", unit="step")
    bar.update(status="loss 2.310, 7,800 tok/s"); bar.close()

On a terminal a long loop shows a tqdm bar. Elsewhere (a log file, CI, a step of `distillery
run`) it prints a heartbeat line every `HEARTBEAT_S` seconds: where it is, its own numbers, and
the time left. Messages go to stderr through the `distillery` logger, which has its own handler:
the root logger and other libraries' loggers are left alone (their INFO lines never show here).

Under `distillery run` (pipelines/console.py sets $DISTILLERY_CONSOLE for the steps it starts),
every line of this logger carries `MARK`, so the run's console shows it and files everything else
a step prints (KFP's executor, DeepSpeed, Great Expectations...) in that step's log.
"""

from __future__ import annotations

import logging
import os
import sys
import time

MARK = "::distillery:: "
"""Prefix of the lines the run's console shows (pipelines/console.py strips it)."""
CONSOLE_ENV = "DISTILLERY_CONSOLE"
"""Set by `distillery run` for its steps: mark this logger's lines."""
HEARTBEAT_S = 15.0
"""Seconds between heartbeat lines of a long loop when the output is not a terminal."""


RATE_NAMES = {"tokens": "tok", "completions": "completions"}


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            text = f"warning: {text}"
        return (MARK + text) if os.environ.get(CONSOLE_ENV) else text


class _Stderr(logging.StreamHandler):
    """A StreamHandler on whatever sys.stderr is at each record (a test or a console may swap it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _logger() -> logging.Logger:
    logger = logging.getLogger("distillery")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(_Formatter())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


log = _logger()


def duration(seconds: float) -> str:
    """`42s`, `3m05s`, `1h02m`: short, for progress and step lines."""
    s = int(round(seconds))
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Progress of a loop of `total` units: a tqdm bar on a terminal, heartbeat lines elsewhere.

    `update(n, status, tokens=...)` advances by n units; `status` is the loop's own numbers
    ("loss 2.31"), shown on the bar or in the next heartbeat line; `tokens` (any counts, named)
    are summed and shown as rates over the time since the last line ("7,800 tok/s"), so one slow
    step (an evaluation) does not pass for the speed. Disabled, it shows nothing (other ranks of
    a data-parallel run)."""

    def __init__(self, total: int, desc: str, unit: str = "step", initial: int = 0, enabled: bool = True,
                 every: float = HEARTBEAT_S):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.n = self.start = initial
        self.enabled = enabled
        self.status = ""
        self.t0 = self.last = time.monotonic()
        self.counts: dict[str, float] = {}
        self.bar = None
        if enabled and not os.environ.get(CONSOLE_ENV) and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=False)

    def update(self, n: int = 1, status: str = "", **counts: float) -> None:
        self.n += n
        self.status = status or self.status
        for name, value in counts.items():
            self.counts[name] = self.counts.get(name, 0.0) + value
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            if status:
                self.bar.set_postfix_str(status, refresh=False)
            return
        if time.monotonic() - self.last >= self.every:
            log.info(self.line())

    def line(self) -> str:
        """`train base: step 250/1000 (25%), loss 2.310, 7,800 tok/s, ETA 1m40s`."""
        now = time.monotonic()
        elapsed, window = now - self.t0, max(now - self.last, 1e-9)
        done = self.n - self.start
        parts = [f"{self.desc}: {self.unit} {self.n:,}/{self.total:,} ({100 * self.n / max(self.total, 1):.0f}%)"]
        if self.status:
            parts.append(self.status)
        parts += [f"{value / window:,.0f} {RATE_NAMES.get(name, name)}/s" for name, value in self.counts.items()]
        self.counts = {}
        self.last = now
        if done > 0 and self.n < self.total:
            parts.append(f"ETA {duration(elapsed / done * (self.total - self.n))}")
        return ", ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
