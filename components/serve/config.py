"""Typed configs of the serving steps (the `serve` section of params.yaml).

    serve:
      export:   {name: distillery, max_batch_size: 8, max_queue_delay_us: 2000, ...}
      server:   {startup_timeout_s: 120, ...}
      check:    {prompts: [...], max_tokens: 16, atol: 1.0e-4}
      loadtest: {concurrency: [1, 4, 16], requests_per_level: 64, ...}

Each sub-section is its own dataclass with a docstring under every field, loaded strictly by
`components.config.from_dict` (an unknown key is an error naming its dotted path).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from components.config import require

RESTRICTABLE = ("health", "metadata", "inference", "shared-memory", "model-config", "model-repository",
                "statistics", "trace", "logging")


@dataclass
class ExportConfig:
    """serve.export: a model folder -> a Triton model repository (python backend, numbered versions)."""

    name: str = "distillery"
    """Prefix of the Triton model names: `<name>_generate` (text -> text) and `<name>_score`
    (token ids -> per-token log-probabilities)."""
    max_batch_size: int = 8
    """Largest batch (requests x rows) one model execution takes; Triton refuses a bigger request
    with HTTP 400 before it reaches the model."""
    dynamic_batching: bool = True
    """Let Triton's dynamic batcher group concurrent requests into one execution."""
    max_queue_delay_us: int = 2000
    """Dynamic batching: longest a request waits for others to join its batch, in microseconds."""
    instances: int = 1
    """Model instances (stub processes) per model, each on the CPU (KIND_CPU)."""
    torch_threads: int = 1
    """torch.set_num_threads in each instance (0 leaves torch's default: all cores)."""
    max_tokens_default: int = 32
    """Generate: new tokens when a request sets no `max_tokens` parameter."""
    max_tokens_limit: int = 256
    """Generate: largest `max_tokens` a request may ask for (also bounded by the model's block_size:
    prompt tokens + max_tokens must fit, so decoding always runs on the KV cache)."""
    onnx: bool = False
    """Also write `<name>_score/<N>/model.onnx`, the scoring graph checked against torch with
    onnxruntime; an artifact beside the served model (the wheel has no onnxruntime backend).
    Needs the `onnx`, `onnxscript` and `onnxruntime` packages."""

    def check(self) -> None:
        require(bool(self.name) and self.name.replace("_", "").replace("-", "").isalnum(),
                f"name: {self.name!r} must be letters, digits, '_' or '-'")
        require(self.max_batch_size >= 1, "max_batch_size: must be at least 1")
        require(self.max_queue_delay_us >= 0, "max_queue_delay_us: must not be negative")
        require(self.instances >= 1, "instances: must be at least 1")
        require(self.torch_threads >= 0, "torch_threads: must not be negative (0: torch's default)")
        require(1 <= self.max_tokens_default <= self.max_tokens_limit,
                "max_tokens_default: must be within 1..max_tokens_limit")


@dataclass
class ServerConfig:
    """A local `tritonserver` process (components/serve/server.py)."""

    binary: str = ""
    """Path of the tritonserver binary; empty: the one in the nvidia-pytriton wheel, else `tritonserver` on PATH."""
    host: str = "127.0.0.1"
    """Address the HTTP, gRPC and metrics endpoints bind to."""
    http_port: int = 0
    """HTTP port (0: a free one picked at start; Triton's usual is 8000)."""
    grpc_port: int = 0
    """gRPC port (0: a free one; Triton's usual is 8001)."""
    metrics_port: int = 0
    """Prometheus metrics port (0: a free one; Triton's usual is 8002)."""
    startup_timeout_s: float = 120.0
    """Seconds to wait for the server to report live; on timeout the error carries the log tail."""
    load_timeout_s: float = 300.0
    """Client timeout of one model-load call (a python-backend model imports torch first)."""
    exit_timeout_s: int = 5
    """tritonserver --exit-timeout-secs: on SIGINT, how long in-flight requests (and open client
    connections) may hold up the shutdown."""
    stop_timeout_s: float = 30.0
    """Seconds after SIGINT before the server process group is killed."""
    restrict: list[str] = field(default_factory=lambda: ["model-repository", "shared-memory", "logging", "trace"])
    """APIs that need the server's private header on both HTTP and gRPC (--http-restricted-api /
    --grpc-restricted-protocol); only this process's helpers know it. Loading or unloading models
    from any other client is refused."""
    shm_default_bytes: int = 4 * 1024 * 1024
    """Python backend: initial shared-memory region per stub (its own default is 64 MiB, too much
    for a 64 MiB /dev/shm in a pod)."""
    shm_growth_bytes: int = 1024 * 1024
    """Python backend: growth step of that region."""
    log_verbose: int = 0
    """tritonserver --log-verbose level (0: info, warnings and errors only)."""

    def check(self) -> None:
        unknown = sorted(set(self.restrict) - set(RESTRICTABLE))
        require(not unknown, f"restrict: unknown API {unknown}; known: {', '.join(RESTRICTABLE)}")
        require(self.startup_timeout_s > 0 and self.load_timeout_s > 0 and self.stop_timeout_s > 0,
                "startup_timeout_s, load_timeout_s and stop_timeout_s must be positive")
        require(self.shm_default_bytes >= 1024 * 1024 and self.shm_growth_bytes >= 4096,
                "shm_default_bytes >= 1 MiB and shm_growth_bytes >= 4 KiB")
        require(self.log_verbose >= 0, "log_verbose: must not be negative")
        for key in ("http_port", "grpc_port", "metrics_port"):
            require(0 <= getattr(self, key) < 65536, f"{key}: must be a port number (0: pick a free one)")
        require(0 <= self.exit_timeout_s < self.stop_timeout_s, "exit_timeout_s: must be within [0, stop_timeout_s)")


@dataclass
class CheckConfig:
    """serve.check: load a version into a real server, probe it over HTTP and gRPC, compare in-process."""

    prompts: list[str] = field(default_factory=lambda: ["1 + 2 =", "What is 3 * 4?", "The answer is"])
    """Probe prompts for `<name>_generate`, decoded greedily (temperature 0): the text must equal
    the in-process model.generate exactly."""
    max_tokens: int = 16
    """New tokens per probe prompt."""
    score_texts: list[str] = field(default_factory=lambda: ["1 + 2 = 3", "12 * 3 = 36 #### 36"])
    """Probe texts for `<name>_score`, tokenized by the model's tokenizer (at least 2 tokens each)."""
    atol: float = 1e-4
    """Largest allowed |served - in-process| per-token log-probability."""
    protocols: list[str] = field(default_factory=lambda: ["http", "grpc"])
    """Client protocols every probe goes through."""

    def check(self) -> None:
        require(bool(self.prompts) and all(self.prompts), "prompts: at least one, none empty")
        require(self.max_tokens >= 1, "max_tokens: must be at least 1")
        require(bool(self.score_texts), "score_texts: at least one")
        require(self.atol > 0, "atol: must be positive")
        require(bool(self.protocols) and set(self.protocols) <= {"http", "grpc"},
                "protocols: a non-empty list of 'http' and 'grpc'")


@dataclass
class LoadtestConfig:
    """serve.loadtest: a concurrency sweep through tritonclient, dynamic batching on and off."""

    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16])
    """Client threads in flight at once, one sweep point each."""
    requests_per_level: int = 64
    """Requests sent at each concurrency (after `warmup` requests that are not timed)."""
    warmup: int = 4
    """Untimed requests before each sweep point."""
    model: str = "generate"
    """Which model is driven: "generate" (prompt -> text) or "score" (ids -> log-probs)."""
    protocol: str = "grpc"
    """Client protocol, "http" or "grpc"."""
    max_tokens: int = 16
    """Generate: new tokens per request (greedy)."""
    prompt: str = "1 + 2 ="
    """Generate: the prompt of every request (score: its tokens)."""
    batching: list[bool] = field(default_factory=lambda: [True, False])
    """Sweep with dynamic batching on and/or off (the model is reloaded with each config)."""

    def check(self) -> None:
        require(bool(self.concurrency) and all(c >= 1 for c in self.concurrency),
                "concurrency: a non-empty list of positive integers")
        require(self.requests_per_level >= 1 and self.warmup >= 0, "requests_per_level >= 1 and warmup >= 0")
        require(self.model in ("generate", "score"), f"model: {self.model!r} is not 'generate' or 'score'")
        require(self.protocol in ("http", "grpc"), f"protocol: {self.protocol!r} is not 'http' or 'grpc'")
        require(self.max_tokens >= 1, "max_tokens: must be at least 1")
        require(bool(self.prompt), "prompt: must not be empty")
        require(bool(self.batching), "batching: at least one of true / false")


@dataclass
class ServeConfig:
    """The whole `serve` section: one sub-config per serving step."""

    export: ExportConfig = field(default_factory=ExportConfig)
    """serve.export: the Triton model repository."""
    server: ServerConfig = field(default_factory=ServerConfig)
    """The local tritonserver process used by check and loadtest."""
    check: CheckConfig = field(default_factory=CheckConfig)
    """serve.check: the infrastructure check of a new version."""
    loadtest: LoadtestConfig = field(default_factory=LoadtestConfig)
    """serve.loadtest: the concurrency sweep."""
