"""`distillery run` as a user meets it: the console's lines, a killed run resumed by the same
command, and the commands its summary prints, run as printed."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from components.console import MARK, Progress
from pipelines.console import RunConsole

REPO = Path(__file__).resolve().parents[2]


class Lines:
    """A stream that keeps what the console shows, with when."""

    def __init__(self):
        self.lines: list[tuple[float, str]] = []
        self._part = ""

    def write(self, text: str) -> int:
        self._part += text
        while "\n" in self._part:
            line, self._part = self._part.split("\n", 1)
            self.lines.append((time.monotonic(), line))
        return len(text)

    def flush(self) -> None:
        pass

    def text(self) -> list[str]:
        return [line for _, line in self.lines]


def test_the_console_shows_step_lines_and_marked_output_and_files_the_rest(tmp_path):
    root, logs = tmp_path / "kfp", tmp_path / "logs"
    root.mkdir()
    shown = Lines()
    console = RunConsole(["ingest", "validate"], root, logs, stream=shown, silence=3600)
    with console:
        print("\x1b[96m12:00:00.000 - INFO - Executing task \x1b[96m'ingest'\x1b[0m")
        print('    {"inputs": {"parameterValues": {"rows": 2000.0}}}')  # the executor's JSON: not shown
        print(f"    {MARK}ingest: 2,000 rows")
        print("12:00:01.000 - INFO - Task 'ingest' finished with status SUCCESS")
        print("12:00:01.100 - INFO - Executing task 'validate'")
        print("    Traceback (most recent call last):")
        print("    components.data.validate.GateFailed: raw.jsonl: validation gate failed: 40% quarantined")
        print("12:00:02.000 - INFO - Task 'validate' finished with status FAILURE")
    text = shown.text()
    assert text[0] == "[1/2] ingest           started"
    assert text[1] == "        ingest: 2,000 rows"
    assert text[2].startswith("[1/2] ingest           done in")
    assert text[3] == "[2/2] validate         started"
    assert text[4].startswith("[2/2] validate         FAILED after") and \
        text[4].endswith("GateFailed: raw.jsonl: validation gate failed: 40% quarantined")
    assert text[5] == f"        full log: {logs / 'validate.log'}"
    assert len(text) == 6  # nothing else: no executor JSON, no traceback
    assert "parameterValues" in (logs / "ingest.log").read_text()  # all of it is in the step's log
    assert "Traceback" in (logs / "validate.log").read_text()
    assert console.steps["ingest"].status == "done" and console.steps["validate"].status == "failed"


def test_a_silent_step_still_gets_a_heartbeat(tmp_path):
    root = tmp_path / "kfp"
    root.mkdir()
    shown = Lines()
    with RunConsole(["train-base"], root, tmp_path / "logs", stream=shown, silence=0.3):
        print("12:00:00.000 - INFO - Executing task 'train-base'")
        time.sleep(1.5)
        print("12:00:02.000 - INFO - Task 'train-base' finished with status SUCCESS")
    beats = [line for line in shown.text() if "still running" in line]
    assert len(beats) >= 2 and beats[0].strip().startswith("train-base: still running (")
    gaps = [b - a for (a, _), (b, _) in zip(shown.lines, shown.lines[1:])]
    assert max(gaps) < 1.3  # never quiet for long, whatever the step prints


def test_progress_prints_heartbeat_lines_with_rates_when_not_a_terminal(capsys):
    bar = Progress(100, "train base", "step", every=0.0)
    for _ in range(3):
        bar.update(status="loss 2.000", tokens=1000)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and lines[-1].startswith("train base: step 3/100 (3%), loss 2.000, ")
    assert re.search(r"[\d,]+ tok/s, ETA ", lines[-1])


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the run ended before the moment to kill it"
        assert time.monotonic() < deadline, "the run never reached the moment to kill it"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole run: the launcher and the step it is running
    proc.wait()


def test_a_killed_run_resumes_with_the_same_command_and_its_hints_work(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pipelines.cli", "run", "--preset", "tiny", "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    # killed once train-base has written its first checkpoint (step 15 of the tiny preset's 30)
    _kill_when(first, lambda: any(p.read_text().strip() == "step-00000015"
                                  for p in (out / "checkpoints").glob("*/checkpoints/latest")))
    killed_at = first.stdout.read()
    assert "[ 5/13] train-base       started" in killed_at and "train-base       done" not in killed_at

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    lines = again.stdout.splitlines()
    assert len(lines) < 80, again.stdout
    for step in ("ingest", "validate", "filter-rows", "split"):  # done before the kill: not run again
        assert any(re.match(rf"\[ *\d+/13\] {step} +cached", line) for line in lines), step
    assert re.search(r"train: resuming from \S+ \(step 15 of 30\)", again.stdout)
    base = out / "latest" / "train-base" / "model"
    assert [json.loads(line)["step"] for line in open(base / "metrics.jsonl")] == list(range(1, 31))
    assert not list((out / "checkpoints").iterdir())  # finished steps leave no working folder behind
    assert json.loads((out / "latest" / "run.json").read_text())["steps"][4]["status"] == "done"
    for task in ("ingest", "split", "train-base", "promote"):  # the newest run's folder shows every task
        assert (out / "latest" / task / "executor_output.json").is_file(), task
    assert "promoted to staging" in (out / "latest" / "reports" / "promote.html").read_text()

    # the summary's next commands, run exactly as printed
    hints = lines[lines.index("next:") + 1:]
    assert [h.split()[3 if h.split()[1] == "-m" else 1] for h in hints] == ["generate", "registry", "serve", "promote"]
    for hint in hints:
        argv = shlex.split(hint)
        if " serve " in hint:  # runs until stopped: wait for it to serve, then stop it as Ctrl-C would
            server = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            try:
                first_line = server.stdout.readline()
                while "tritonserver ready" not in first_line and first_line:
                    first_line = server.stdout.readline()
                assert "tritonserver ready" in first_line
            finally:
                server.send_signal(signal.SIGTERM)
                assert server.wait(timeout=60) == 0
            # stopped while it starts the server and loads the models: it stops them, in one line
            server = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert "exported as version" in server.stdout.readline()
            server.send_signal(signal.SIGTERM)
            said, err = server.communicate(timeout=120)
            assert server.returncode == 0 and said.strip().endswith("serve: stopped") and "Traceback" not in err, err
            continue
        done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{hint}\n{done.stdout}\n{done.stderr}"
        if " registry show " in hint:
            assert json.loads(done.stdout)["stages"]["staging"] == "v0.0.1"
    current = subprocess.run([sys.executable, "-m", "pipelines.cli", "registry", "current", "--stage", "production",
                              "--registry", str(out / "registry")], cwd=REPO, capture_output=True, text=True)
    assert current.stdout.strip() == "v0.0.1"  # the printed promote did promote
