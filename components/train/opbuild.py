"""DeepSpeed's just-in-time C++ ops at a training start: no start waits on a dead build's lock.

    opbuild.guard()          # before DeepSpeed initializes (engine._single_process_group)
    distillery ops                                # clear dead builds' locks, list the rest (`report`)
    distillery ops --build deepspeed_shm_comm     # build an op now, bounded (`build`)

On the CPU accelerator the only op DeepSpeed compiles at a start is its communication backend's
shared-memory op, `deepspeed_shm_comm` (comm/torch.py `build_shm_op`; `deepspeed_ccl_comm` under
oneCCL), through torch.utils.cpp_extension.load into <torch extensions root>/<op>/:
$TORCH_EXTENSIONS_DIR/<op>, else ~/.cache/torch_extensions/py311_cpu/<op>. torch serialises
builds with a FileBaton, a `lock` file created at the start of a build and removed at its end;
every other process that loads the op sleeps while the file exists, with no message and no
limit. A build that is killed (Ctrl-C, SIGKILL, a pod evicted during a machine's first start)
never removes it, and every later load of the op on that machine waits forever.

Training never builds the op (engine._skip_shm_op: it serves only DeepSpeed's tensor-parallel
inference), so a start meets a lock only when that skip stops working (a DeepSpeed upgrade) or
another DeepSpeed program on the machine left one behind. `guard` covers both:

- a `lock` that no process on this machine holds open (torch's builder keeps it open for the
  whole build; looked at twice, half a second apart) is a dead build's: removed, one line;
- an op this start would build is built first by `build`: in a child process under our own
  flock (released by the kernel when its holder dies, so a killed start never blocks the next),
  bounded by $DISTILLERY_OP_BUILD_TIMEOUT seconds (default 900; a build takes 1.5 to 5 minutes
  on 2 cores), its compiler output in <build dir>/distillery-build.log; a failed or stuck build
  is one line naming that log. DeepSpeed then loads the built op without compiling.

Only this machine's processes are visible (/proc): keep $TORCH_EXTENSIONS_DIR on a local disk,
not on a volume that several machines build into at once.

Not built at install time: training never loads the op, and building it costs every install
minutes of compiling; `--build` is there for a machine that wants it (DeepSpeed's inference).
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from components.console import log
from components.errors import InputError

BUILDERS = {"deepspeed_shm_comm": "ShareMemCommBuilder", "deepspeed_ccl_comm": "CCLCommBuilder"}
"""The ops DeepSpeed's communication backend builds at a start on the CPU accelerator, by the
name of their build folder, with their builder's class (accelerator.create_op_builder)."""
TIMEOUT_ENV = "DISTILLERY_OP_BUILD_TIMEOUT"
TIMEOUT_S = 900.0
"""Seconds an op's build (or a wait for another process's build) may take before the start stops."""
LOG_NAME = "distillery-build.log"
FLOCK_NAME = "distillery-build.lock"


class OpBuildError(InputError, RuntimeError):
    """An op build that failed, hung, or is held by something this start cannot judge (one line)."""


def extensions_root() -> Path:
    """Where torch builds its extensions (torch.utils.cpp_extension._get_build_directory's parent)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is not None:
        return Path(root)
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        accel = "rocm" + torch.version.hip.replace(".", "")
    elif torch.version.cuda is not None:
        accel = "cu" + torch.version.cuda.replace(".", "")
    else:
        accel = "cpu"
    py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{py}_{accel}"


def build_dir(name: str) -> Path:
    return extensions_root() / name


def _timeout() -> float:
    value = os.environ.get(TIMEOUT_ENV, "")
    try:
        return float(value) if value else TIMEOUT_S
    except ValueError:
        raise OpBuildError(f"${TIMEOUT_ENV}: {value!r} is not a number of seconds") from None


def holders(path: Path) -> tuple[list[int], bool]:
    """(pids of this machine's processes that hold `path` open, whether every process could be
    looked at: another user's are hidden unless we are root)."""
    target = os.path.realpath(path)
    pids, complete = [], True
    try:
        procs = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return [], False
    for pid in procs:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue  # it ended
        except PermissionError:
            complete = False
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    pids.append(int(pid))
                    break
            except OSError:
                continue
    return pids, complete


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def lock_state(lock: Path) -> tuple[str, list[int]]:
    """("gone" | "held" | "stale" | "unknown", holders) of torch's build lock `lock`. Stale: no
    process holds it open, twice half a second apart (so a build between closing and removing
    its lock is not mistaken for a dead one), the same file both times."""
    first = _identity(lock)
    if first is None:
        return "gone", []
    pids, complete = holders(lock)
    if pids:
        return "held", pids
    try:
        if not complete and lock.stat().st_uid != os.getuid():
            return "unknown", []
    except FileNotFoundError:
        return "gone", []
    time.sleep(0.5)
    if _identity(lock) != first:
        return lock_state(lock)
    pids, _ = holders(lock)
    return ("held", pids) if pids else ("stale", [])


def clear_stale(lock: Path, op: str, quiet: bool = False) -> str:
    """Remove `lock` when it is a dead build's (one line saying so, unless `quiet`); returns its state."""
    state, _ = lock_state(lock)
    if state == "stale":
        try:
            lock.unlink()
        except FileNotFoundError:  # another rank of this start removed it first
            return "gone"
        if not quiet:
            log.warning("train: removed %s, the lock of a %s build that was stopped (no process holds it); "
                        "without this every start that loads the op would wait on it forever", lock, op)
    return state


def will_build(name: str) -> bool:
    """Whether DeepSpeed's communication backend loads op `name` when it initializes in this
    process: its table of compatible ops when set (engine._skip_shm_op sets it), else the probe of
    this one op (DeepSpeed's own probe compiles test programs for every op)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if name == "deepspeed_ccl_comm":
        return get_accelerator().communication_backend_name() == "ccl"
    table = vars(deepspeed.ops).get("__compatible_ops__")
    if table is not None:  # engine._skip_shm_op's, or DeepSpeed's own probe's
        return bool(table.get(name, False))
    from deepspeed.ops.op_builder.builder import probe_is_compatible

    builder = get_accelerator().create_op_builder(BUILDERS[name])  # what build_shm_op will ask
    return builder is not None and bool(probe_is_compatible(builder))


def guard() -> None:
    """Before DeepSpeed initializes: remove dead builds' locks of the ops DeepSpeed may build,
    and build first (bounded, one line on failure) any op this start would build."""
    for name in BUILDERS:
        lock = build_dir(name) / "lock"
        if lock.exists():
            state = clear_stale(lock, name)
            if state == "unknown":
                log.warning("train: %s belongs to another user and may be a live build; if no build of %s "
                            "is running, remove it: rm %s", lock, name, lock)
        if will_build(name):
            build(name)


@contextmanager
def _flock(path: Path, deadline: float, name: str):
    """Our own exclusive lock on `path`: the kernel drops it when its holder dies."""
    with open(path, "a+") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    f.seek(0)
                    raise OpBuildError(f"another start ({f.read().strip() or 'pid unknown'}) has been building "
                                       f"DeepSpeed's {name} op for over {_timeout():.0f} s; wait for it, or stop it "
                                       f"and run again (${TIMEOUT_ENV} sets the limit)") from None
                time.sleep(0.5)
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build(name: str) -> Path:
    """Build op `name` (a no-op compile check when it is built already) in a child process, under
    our flock, within $DISTILLERY_OP_BUILD_TIMEOUT seconds; returns its build folder."""
    if name not in BUILDERS:
        raise OpBuildError(f"{name}: not one of DeepSpeed's start-up ops ({', '.join(BUILDERS)})")
    folder = build_dir(name)
    folder.mkdir(parents=True, exist_ok=True)
    lock, out = folder / "lock", folder / LOG_NAME
    limit = _timeout()
    deadline = time.monotonic() + limit
    again = f"{sys.executable} -m pipelines.cli ops --build {name}"
    with _flock(folder / FLOCK_NAME, deadline, name):
        # under our flock only a program other than distillery can be building here
        while clear_stale(lock, name) in ("held", "unknown"):  # a live build: wait for it, within the limit
            pids = " ".join(map(str, holders(lock)[0]))
            if time.monotonic() > deadline:
                raise OpBuildError(
                    f"{lock}: process {pids} has held DeepSpeed's {name} build lock for over {limit:.0f} s; stop it "
                    f"(kill {pids}) or remove the lock (rm {lock}) and run again" if pids else
                    f"{lock}: another user's build lock of DeepSpeed's {name} op, held for over {limit:.0f} s; "
                    f"if no build of it is running, remove it (rm {lock}) and run again")
            time.sleep(1.0)
        with open(out, "w") as logf:
            child = subprocess.Popen([sys.executable, "-m", "components.train.opbuild", name],
                                     stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=Path(__file__).resolve().parents[2])
            try:
                code = child.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill_session(child.pid)
                child.wait()
                clear_stale(lock, name, quiet=True)  # the build we just stopped left it
                raise OpBuildError(f"DeepSpeed's {name} op did not finish building in {limit:.0f} s (stopped; its "
                                   f"output is in {out}); build it alone with `{again}` "
                                   f"(${TIMEOUT_ENV} sets the limit)") from None
    if code != 0:
        raise OpBuildError(f"DeepSpeed's {name} op failed to build (exit status {code}); the compiler's output "
                           f"is in {out}; fix what it says, then run `{again}`")
    return folder


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid` (the build's child, ninja, and the compilers, which
    ninja starts in process groups of their own, so killing one group would miss them)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:  # after the name: state, ppid, pgrp, session
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, IndexError, ValueError):
            continue


def _compile(name: str) -> int:
    """The child of `build`: DeepSpeed's own builder, verbose, into the log."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder(BUILDERS[name])
    builder.load(verbose=True)
    print(f"built {name} in {build_dir(name)}")
    return 0


def report() -> list[str]:
    """Clear dead builds' locks (one warning each) and say which builds are live: `distillery ops`."""
    lines = []
    for name in BUILDERS:
        lock = build_dir(name) / "lock"
        state = clear_stale(lock, name) if lock.exists() else "gone"
        if state == "held":
            lines.append(f"{lock}: a build in progress (pid {', '.join(map(str, holders(lock)[0]))})")
        elif state == "unknown":
            lines.append(f"{lock}: another user's; if no build of {name} is running, remove it: rm {lock}")
    return lines


if __name__ == "__main__":  # the child of `build`: python -m components.train.opbuild OP
    sys.exit(_compile(sys.argv[1]))
