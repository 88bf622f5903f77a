"""The console of `distillery run`: a line per step as it starts and ends, heartbeats, a summary.

kfp.local runs each step in a subprocess and prints everything the step writes (its executor's
input JSON, DeepSpeed's and Great Expectations' chatter, tracebacks), plus its own task and
output records. `RunConsole` stands in for sys.stdout (and takes the root logger's records) while
the DAG runs and turns that into:

    [ 5/13] train-base         started
            train base: step 250/1000 (25%), loss 1.234, 8,100 tok/s, ETA 1m40s
    [ 5/13] train-base         done in 2m13s: val_loss 1.02, tokens_per_s 8,400

Everything a step prints goes to `<out>/logs/<task>.log`; the console shows only the lines the
steps mark for it (components/console.py: the `distillery` logger and progress heartbeats), and
when a step fails, its error line and where its log is. If nothing was shown for `SILENCE_S`
seconds, a heartbeat line says which step is running and for how long, so a run is never silent
for 30 seconds, terminal or not. `verbose` shows everything, as plain kfp.local does.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from components.console import CONSOLE_ENV, MARK, duration

SILENCE_S = 25.0
"""Longest quiet stretch before the console prints a heartbeat of its own."""
ANSI = re.compile(r"\x1b\[[0-9;]*m")
KFP_PREFIX = re.compile(r"^\d\d:\d\d:\d\d\.\d+ - [A-Z]+ - ")
STARTED = re.compile(r"^Executing task '(?P<task>[^']+)'")
FINISHED = re.compile(r"^Task '(?P<task>[^']+)' finished with status (?P<status>[A-Z]+)")
CACHED = re.compile(r"^Task (?P<task>\S+) cache hit \(key=(?P<key>[0-9a-f]+)\)")

HEADLINE = {
    "ingest": ("rows", "noise_rows"),
    "validate": ("clean", "quarantined"),
    "filter-rows": ("rows_kept", "rows_removed"),
    "split": ("train_rows", "val_rows", "test_rows"),
    "train-base": ("val_loss", "tokens_per_s"),
    "train-reinforce": ("final_reward", "final_accuracy", "val_loss"),
    "train-finetune": ("val_loss",),
    "evaluate-stages": ("base_accuracy", "reinforce_accuracy", "finetune_accuracy"),
    "distill": ("student_accuracy", "teacher_accuracy", "param_ratio"),
    "quantize": ("int8_accuracy", "float_accuracy", "size_ratio"),
    "serve-export": ("version",),
    "serve-check": ("check_passed", "check_seconds"),
    "promote": ("promoted", "accuracy"),
}
"""The metrics a step's done line shows (all of them are in its KFP Metrics artifact)."""


def number(value: Any) -> str:
    """A metric rounded for people: 3 significant digits, thousands separated."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    if isinstance(value, int) or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


@dataclass
class Step:
    """One task of the run, as the console saw it."""

    name: str
    status: str = "pending"  # pending, running, done, cached, failed
    started: float = 0.0
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None  # where its outputs are (this run's, or the run that cached them)

    def headline(self) -> str:
        keys = HEADLINE.get(self.name, ())
        return ", ".join(f"{k} {number(self.metrics[k])}" for k in keys if k in self.metrics)


class _Records(logging.Handler):
    """The root logger's records (kfp.local's task lines outside its own logging context)."""

    def __init__(self, console: "RunConsole"):
        super().__init__(logging.INFO)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.message(record.getMessage())
        except Exception:  # noqa: BLE001 - a console must never take the run down
            self.handleError(record)


class RunConsole:
    """Stands in for sys.stdout while kfp.local runs the DAG (see the module docstring)."""

    def __init__(self, order: list[str], root: Path, logs: Path, verbose: bool = False,
                 stream: TextIO | None = None, silence: float = SILENCE_S):
        self.order = order
        self.steps = {name: Step(name) for name in order}
        self.root, self.logs, self.verbose, self.silence = root, logs, verbose, silence
        self.stream = stream or sys.stdout
        self.run_dir: Path | None = None
        self.current: Step | None = None
        self.error = ""
        self._buffer = ""
        self._log: TextIO | None = None
        self._lock = threading.RLock()
        self._last_shown = time.monotonic()
        self._stop = threading.Event()
        self._before = {p.name for p in root.iterdir()} if root.is_dir() else set()

    # --- set-up ---------------------------------------------------------------------------
    def __enter__(self) -> "RunConsole":
        self.logs.mkdir(parents=True, exist_ok=True)
        self._saved = (sys.stdout, os.environ.get(CONSOLE_ENV), logging.getLogger().level)
        sys.stdout = self  # type: ignore[assignment]
        os.environ[CONSOLE_ENV] = "1"  # the steps (subprocesses) mark their own lines
        self._handler = _Records(self)
        root = logging.getLogger()
        root.addHandler(self._handler)
        root.setLevel(logging.INFO)
        self._watch = threading.Thread(target=self._watchdog, name="run-console-heartbeat", daemon=True)
        self._watch.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.flush()
        stdout, env, level = self._saved
        sys.stdout = stdout
        if env is None:
            os.environ.pop(CONSOLE_ENV, None)
        else:
            os.environ[CONSOLE_ENV] = env
        root = logging.getLogger()
        root.removeHandler(self._handler)
        root.setLevel(level)
        self._close_log()

    # --- the file-like side ---------------------------------------------------------------
    def write(self, text: str) -> int:
        with self._lock:
            self._buffer += text
            while "\n" in self._buffer:
                line, self._buffer = self._buffer.split("\n", 1)
                self.line(line)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._buffer:
                line, self._buffer = self._buffer, ""
                self.line(line)
            self.stream.flush()

    def isatty(self) -> bool:
        return False

    # --- what a line means ----------------------------------------------------------------
    def line(self, raw: str) -> None:
        """One line kfp.local printed: one of its own records, or a line of the running step."""
        plain = ANSI.sub("", raw)
        if KFP_PREFIX.match(plain):
            self.message(KFP_PREFIX.sub("", plain))
            return
        self.output(plain)

    def message(self, text: str) -> None:
        """One record of kfp.local's orchestrator (or any other logger of this process)."""
        text = ANSI.sub("", text)
        with self._lock:
            if m := STARTED.match(text):
                self._started(m["task"])
            elif m := FINISHED.match(text):
                self._finished(m["task"], m["status"] == "SUCCESS")
            elif m := CACHED.match(text):
                self._cached(m["task"], m["key"])
            elif self.verbose:
                self.show(text)
            elif self._log is not None:
                self._log.write(text + "\n")

    def output(self, text: str) -> None:
        """One line the running step printed: shown if it is marked for the console, else logged."""
        with self._lock:
            body = text[4:] if text.startswith("    ") else text  # kfp.local indents a step's lines
            if self._log is not None:
                self._log.write(body.replace(MARK, "") + "\n")
            if MARK in body:
                self.show("        " + body.split(MARK, 1)[1])
            elif self.verbose:
                self.show(text)
            elif self.current is not None and body.strip():
                self._last_error_candidate(body)

    def show(self, text: str) -> None:
        with self._lock:
            self.stream.write(text + "\n")
            self.stream.flush()
            self._last_shown = time.monotonic()

    # --- steps ----------------------------------------------------------------------------
    def tag(self, name: str) -> str:
        i = self.order.index(name) + 1 if name in self.order else 0
        width = len(str(len(self.order)))
        return f"[{i:>{width}}/{len(self.order)}] {name:<16}"

    def _step(self, name: str) -> Step:
        return self.steps.setdefault(name, Step(name))

    def _started(self, name: str) -> None:
        step = self._step(name)
        step.status, step.started = "running", time.monotonic()
        self.current, self.error = step, ""
        self._close_log()
        self._log = open(self.logs / f"{name}.log", "w", encoding="utf-8")
        self.show(f"{self.tag(name)} started")

    def _finished(self, name: str, ok: bool) -> None:
        step = self._step(name)
        step.seconds = time.monotonic() - step.started
        self._close_log()
        self.current = None
        if ok:
            step.status, step.folder = "done", self._task_folder(name)
            step.metrics = metrics_of(step.folder / "executor_output.json") if step.folder else {}
            head = step.headline()
            self.show(f"{self.tag(name)} done in {duration(step.seconds)}" + (f": {head}" if head else ""))
        else:
            step.status = "failed"
            self.show(f"{self.tag(name)} FAILED after {duration(step.seconds)}: {self.error or 'see its log'}")
            self.show(f"{' ' * 8}full log: {self.logs / (name + '.log')}")

    def _cached(self, name: str, key: str) -> None:
        step = self._step(name)
        entry = next(iter(sorted((self.root / ".kfp_cache").glob(f"{key}*.json"))), None)
        outputs = json.loads(entry.read_text(encoding="utf-8")) if entry else {}
        step.status = "cached"
        step.metrics = dict((outputs.get("metrics") or {}).get("metadata") or {})
        uris = [Path(o["uri"]) for o in outputs.values() if isinstance(o, dict) and o.get("uri")]
        step.folder = uris[0].parent if uris else None
        head = step.headline()
        self.show(f"{self.tag(name)} cached (done in an earlier run)" + (f": {head}" if head else ""))

    def _task_folder(self, name: str) -> Path | None:
        if self.run_dir is None:
            new = sorted((p for p in self.root.iterdir() if p.is_dir() and p.name not in self._before
                          and not p.name.startswith(".")), key=lambda p: p.stat().st_mtime)
            self.run_dir = new[-1] if new else None
        folder = self.run_dir / name if self.run_dir else None
        return folder if folder and folder.is_dir() else None

    def _last_error_candidate(self, body: str) -> None:
        """Remember the step's likely error line: the last line of a traceback (`XError: ...`)."""
        text = body.strip()
        m = re.match(r"^(?:[\w.]+\.)?(?P<kind>\w*(?:Error|Exception|Failed|Interrupt)): (?P<msg>.+)$", text)
        if m:
            self.error = f"{m['kind']}: {m['msg']}"

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def _watchdog(self) -> None:
        while not self._stop.wait(min(1.0, self.silence / 3)):
            with self._lock:
                step = self.current
                if step is not None and time.monotonic() - self._last_shown >= self.silence:
                    self.show(f"{' ' * 8}{step.name}: still running ({duration(time.monotonic() - step.started)})")


def metrics_of(executor_output: Path) -> dict[str, Any]:
    """The values a task logged to its KFP Metrics artifacts (kfp.local's executor_output.json)."""
    try:
        outputs = json.loads(executor_output.read_text(encoding="utf-8")).get("artifacts", {})
    except (OSError, json.JSONDecodeError):
        return {}
    found: dict[str, Any] = {}
    for art in outputs.get("metrics", {}).get("artifacts", []):  # every step's Metrics output is `metrics`
        found.update(art.get("metadata") or {})
    return found


def summary(steps: list[Step], seconds: float, reports: dict[str, Path], registry: list[str],
            commands: list[str], latest: str) -> list[str]:
    """The end of a run: every step in pipeline order with its time and metrics, the reports as
    file:// links, where the registry is and what it holds, and the next commands."""
    ran = sum(s.status == "done" for s in steps)
    lines = ["", f"run finished in {duration(seconds)} ({ran} steps ran, {len(steps) - ran} found done earlier); "
                 f"{latest}"]
    width = max(len(s.name) for s in steps)
    for s in steps:
        when = duration(s.seconds) if s.status == "done" else s.status
        lines.append(f"  {s.name:<{width}}  {when:>8}  {s.headline()}".rstrip())
    if reports:
        lines.append("reports (open in a browser):")
        lines += [f"  {name:<{width}}  {path.resolve().as_uri()}" for name, path in reports.items()]
    lines += registry
    if commands:
        lines.append("next:")
        lines += [f"  {c}" for c in commands]
    return lines
