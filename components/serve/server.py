"""A real `tritonserver` process on this machine, with the python backend, as a context manager.

    from components.serve.server import TritonServer
    with TritonServer("runs/triton") as server:            # free ports, waits until ready
        server.load("distillery_generate")                  # explicit model control, our header only
        client = server.client("grpc")                      # a tritonclient InferenceServerClient
        ...

    distillery serve --repository REPOSITORY [--stage production]   # serve until Ctrl-C

The binary and the python backend come from the nvidia-pytriton wheel (pytriton/tritonserver/);
`ServerConfig.binary` or a `tritonserver` on PATH is used when the wheel has none.

How the python backend finds its Python. Triton starts one `triton_python_backend_stub` process
per model instance; the stub is looked for in `<backend-directory>/python/`, beside
libtriton_python.so, and the wheel ships one stub per Python version. So each server assembles a
private backend folder (in its temporary work folder) holding python/{libtriton_python.so,
triton_python_backend_utils.py, triton_python_backend_stub of this interpreter's version}, and
starts tritonserver with an environment in which the stub embeds the same Python as this process:

    LD_LIBRARY_PATH  this interpreter's libpython folder (sysconfig LIBDIR) first, so the stub's
                     libpython3.X.so.1.0 is the one matching the venv (not the OS one), then the
                     wheel's nvidia_pytriton.libs (the copied stub loses its $ORIGIN rpath)
    PYTHONPATH       this checkout's root (the `components` package model.py imports), then this
                     interpreter's site-packages (the venv: torch, numpy, safetensors, tokenizers)
    PATH             this interpreter's bin folder first (as pytriton does)

Security defaults: `--model-control-mode=explicit` (nothing loads unless asked), no model loaded at
start, `--disable-auto-complete-config` (config.pbtxt must be complete: nothing is guessed), and the
model-repository API (load, unload, index) plus shared-memory, logging and trace restricted on HTTP
and gRPC to requests carrying a header whose value is a random token only this object knows
(`ServerConfig.restrict`); any other client gets "This API is restricted" (HTTP 403) for those
and may only infer, read metadata, config, statistics and health. Over HTTP the header is
`x-distillery-admin: <token>`; Triton expects it over gRPC as the metadata key
`triton-grpc-protocol-x-distillery-admin`. This object's helpers (load, unload, index) use HTTP.

Ports are picked free at start; all endpoints bind to `ServerConfig.host` (127.0.0.1 by default).
Server output (and the stubs') goes to `log_path` (default $TMPDIR/tritonserver-<pid>-<id>.log,
kept after stop for post-mortems); a start that fails or times out raises with the log's tail.
Stop: SIGINT, Triton drains for `exit_timeout_s` and unloads, then SIGKILL to the process group
(server and stubs) after `stop_timeout_s`. The server also gets SIGTERM if this process dies.
The python backend's shared-memory regions (/dev/shm/<shm_prefix>*) are removed after stop: a
server that crashed (see the README on hostile HTTP bodies) leaves them behind (shm_default_bytes each).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from components.serve.errors import ServeError
from components.serve.config import ServerConfig

ADMIN_HEADER = "x-distillery-admin"
REPO_ROOT = Path(__file__).resolve().parents[2]


class ServerError(ServeError):
    """tritonserver did not start, died, or refused a model-control call."""


def _pytriton_dir() -> Path | None:
    try:
        import pytriton
    except ImportError:
        return None
    return Path(pytriton.__file__).resolve().parent


def find_tritonserver(binary: str = "") -> Path:
    """The tritonserver binary: `binary` if given, else the wheel's, else one on PATH."""
    if binary:
        path = Path(binary)
        if not path.is_file():
            raise ServerError(f"tritonserver binary {binary} does not exist")
        return path
    wheel = _pytriton_dir()
    if wheel is not None and (wheel / "tritonserver" / "bin" / "tritonserver").is_file():
        return wheel / "tritonserver" / "bin" / "tritonserver"
    found = shutil.which("tritonserver")
    if not found:
        raise ServerError("no tritonserver: install nvidia-pytriton (it ships the binary) or put one on PATH")
    return Path(found)


def python_backend_dir(dest: Path) -> Path:
    """Assemble a backend folder for --backend-directory: dest/python/ with the wheel's
    libtriton_python.so and triton_python_backend_utils.py and the stub of this Python version."""
    wheel = _pytriton_dir()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    if wheel is None:
        raise ServerError("the python backend comes from the nvidia-pytriton wheel, which is not installed")
    src = wheel / "tritonserver" / "backends" / "python"
    stub = wheel / "tritonserver" / "python_backend_stubs" / version
    if not (stub / "triton_python_backend_stub").is_file():
        have = sorted(p.name for p in stub.parent.iterdir()) if stub.parent.is_dir() else []
        raise ServerError(f"nvidia-pytriton has no python backend stub for Python {version} (it has {have})")
    out = dest / "python"
    out.mkdir(parents=True, exist_ok=True)
    for f in (src / "libtriton_python.so", src / "triton_python_backend_utils.py", stub / "triton_python_backend_stub"):
        shutil.copy2(f, out / f.name)
    return dest


def stub_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment tritonserver (and so each python-backend stub) runs with; see the module doc."""
    import site

    env = dict(os.environ if base is None else base)

    def prepend(key: str, *paths: str) -> None:
        parts = [p for p in paths if p] + [p for p in env.get(key, "").split(os.pathsep) if p]
        env[key] = os.pathsep.join(dict.fromkeys(parts))

    libdir = sysconfig.get_config_var("LIBDIR") or ""
    soname = sysconfig.get_config_var("INSTSONAME") or ""
    libs = [libdir] if soname and (Path(libdir) / soname).exists() else []
    wheel = _pytriton_dir()
    if wheel is not None and (wheel.parent / "nvidia_pytriton.libs").is_dir():
        libs.append(str(wheel.parent / "nvidia_pytriton.libs"))
    prepend("LD_LIBRARY_PATH", *libs)
    prepend("PYTHONPATH", str(REPO_ROOT), *site.getsitepackages())
    prepend("PATH", str(Path(sys.executable).parent))
    return env


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct TCP ports that were free a moment ago (held open together while picking)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _child_setup() -> None:  # runs in the child before exec: own process group, dies with its parent
    os.setsid()
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class TritonServer:
    """tritonserver on `repository` in explicit model-control mode; use as a context manager."""

    def __init__(self, repository: str | os.PathLike, cfg: ServerConfig | None = None,
                 log_path: str | os.PathLike | None = None, load: tuple[str, ...] = ()):
        self.repository = Path(repository).resolve()
        self.cfg = cfg or ServerConfig()
        self.startup_models = tuple(load)
        self.token = secrets.token_hex(16)
        self.shm_prefix = f"distillery{os.getpid()}_{self.token[:8]}_"  # names of the stubs' /dev/shm regions
        self._log_path = Path(log_path) if log_path else None
        self._workdir: Path | None = None
        self._proc: subprocess.Popen | None = None
        self.http_port = self.grpc_port = self.metrics_port = 0

    # ---- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def log_path(self) -> Path:
        return self._log_path or Path(tempfile.gettempdir()) / f"tritonserver-{os.getpid()}-{self.token[:8]}.log"

    def command(self) -> list[str]:
        """The tritonserver command line (ports must have been picked)."""
        c = self.cfg
        restricted = ",".join(c.restrict)
        args = [
            str(find_tritonserver(c.binary)),
            f"--model-repository={self.repository}",
            "--model-control-mode=explicit",
            "--disable-auto-complete-config",
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--backend-directory={self._workdir / 'backends'}",
            f"--http-address={c.host}", f"--http-port={self.http_port}",
            f"--grpc-address={c.host}", f"--grpc-port={self.grpc_port}",
            "--allow-metrics=true", "--allow-gpu-metrics=false",
            f"--metrics-address={c.host}", f"--metrics-port={self.metrics_port}",
            f"--exit-timeout-secs={c.exit_timeout_s}",
            f"--log-verbose={c.log_verbose}",
            f"--backend-config=python,shm-default-byte-size={c.shm_default_bytes}",
            f"--backend-config=python,shm-growth-byte-size={c.shm_growth_bytes}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
        ]
        if restricted:
            args += [f"--http-restricted-api={restricted}:{ADMIN_HEADER}={self.token}",
                     f"--grpc-restricted-protocol={restricted}:{ADMIN_HEADER}={self.token}"]
        args += [f"--load-model={m}" for m in self.startup_models]
        return args

    def start(self) -> TritonServer:
        if self.is_alive():
            raise ServerError(f"tritonserver already running (pid {self._proc.pid})")
        if not self.repository.is_dir():
            raise ServerError(f"model repository {self.repository} is not a folder")
        self._workdir = Path(tempfile.mkdtemp(prefix="distillery-triton-"))
        python_backend_dir(self._workdir / "backends")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):  # a picked port can be taken before the server binds it
            free = iter(free_ports(3, self.cfg.host))
            self.http_port, self.grpc_port, self.metrics_port = (
                port or next(free) for port in (self.cfg.http_port, self.cfg.grpc_port, self.cfg.metrics_port))
            with open(self.log_path, "ab") as log:
                self._proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, env=stub_environment(),
                                              cwd=self._workdir, preexec_fn=_child_setup)
            try:
                self._wait_ready()
                return self
            except ServerError:
                busy = "address already in use" in self.log_tail(30).lower()
                self.stop(keep_workdir=True)
                if not busy or attempt == 2:
                    shutil.rmtree(self._workdir, ignore_errors=True)
                    raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self._proc.returncode} while starting; "
                                  f"log {self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.2)
        raise ServerError(f"tritonserver not ready after {self.cfg.startup_timeout_s:.0f} s; "
                          f"log {self.log_path}:\n{self.log_tail()}")

    def stop(self, keep_workdir: bool = False) -> None:
        """SIGINT (Triton finishes in-flight requests and unloads), then SIGKILL to the process
        group after `stop_timeout_s`."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=self.cfg.stop_timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # stubs left behind by a crashed server, if any
            for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):  # a crashed server's, if any
                with contextlib.suppress(OSError):
                    region.unlink()
        if self._workdir is not None and not keep_workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # ---- endpoints and clients ----------------------------------------------------------------

    @property
    def http_url(self) -> str:
        return f"{self.cfg.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.cfg.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.cfg.host}:{self.metrics_port}/metrics"

    @property
    def admin_headers(self) -> dict[str, str]:
        """The header that unlocks the restricted APIs; never hand it to other clients."""
        return {ADMIN_HEADER: self.token}

    def client(self, protocol: str = "http", **kwargs):
        """A new tritonclient InferenceServerClient ("http" or "grpc") for this server."""
        if protocol == "http":
            import tritonclient.http as httpclient

            return httpclient.InferenceServerClient(self.http_url, **kwargs)
        if protocol == "grpc":
            import tritonclient.grpc as grpcclient

            return grpcclient.InferenceServerClient(self.grpc_url, **kwargs)
        raise ValueError(f"protocol {protocol!r} is not 'http' or 'grpc'")

    # ---- model control (the only holder of the admin header) ----------------------------------

    def load(self, model: str, config: dict | None = None) -> None:
        """Load (or reload) `model`; with `config`, that JSON model config overrides config.pbtxt.
        A failed load raises ServerError; a reload that fails leaves the serving version loaded."""
        import json

        from tritonclient.utils import InferenceServerException

        client = self.client("http", network_timeout=self.cfg.load_timeout_s,
                             connection_timeout=self.cfg.load_timeout_s)
        try:
            client.load_model(model, headers=self.admin_headers,
                              config=json.dumps(config) if config is not None else None)
        except InferenceServerException as err:
            raise ServerError(f"loading {model} failed: {err.message()}") from None
        finally:
            client.close()

    def unload(self, model: str) -> None:
        from tritonclient.utils import InferenceServerException

        client = self.client("http", network_timeout=self.cfg.load_timeout_s)
        try:
            client.unload_model(model, headers=self.admin_headers)
        except InferenceServerException as err:
            raise ServerError(f"unloading {model} failed: {err.message()}") from None
        finally:
            client.close()

    def index(self) -> list[dict]:
        """The repository index: [{"name", "version", "state", "reason"}] of every model and version."""
        client = self.client("http")
        try:
            return client.get_model_repository_index(headers=self.admin_headers)
        finally:
            client.close()

    def version_states(self, model: str) -> dict[int, tuple[str, str]]:
        """{version: (state, reason)} of `model` in the index (READY, UNAVAILABLE, ...)."""
        return {int(r["version"]): (r.get("state", ""), r.get("reason", "")) for r in self.index()
                if r.get("name") == model and r.get("version")}
