"""The python-backend model that Triton runs: copied by serve.export into each version folder as model.py.

One file serves both models of a repository; the `kind` parameter of config.pbtxt picks which:

    <name>_generate   input  text_input  TYPE_STRING [1]   UTF-8 prompt
                      output text_output TYPE_STRING [1]   the continuation only (not the prompt)
                      request parameters (Triton's own, over HTTP and gRPC alike):
                        max_tokens  int    new tokens, 1..max_tokens_limit (default max_tokens_default)
                        temperature float  0 (the default) is greedy; > 0 samples
                        seed        int    with temperature > 0: a reproducible sample
    <name>_score      input  input_ids   TYPE_INT64 [-1]   2..block_size token ids
                      output logprobs    TYPE_FP32  [-1]   log p(ids[t] | ids[:t]) for t = 1..T-1
                      no request parameters (any is refused)

(Request parameters rather than optional inputs: tritonclient sends them the same way over HTTP
and gRPC, `parameters={"max_tokens": 16}`, and the dynamic batcher can still batch requests
that differ in them, which it would not do for requests whose sets of inputs differ.)

The model folder is the `model_folder/` beside this file, read by components.model.folder.load_model
(so quantized folders load the same way); the stub finds the `components` package and torch on the
PYTHONPATH that components/serve/server.py gives it.

Every request is validated here (Triton has already checked names, dtypes, ranks and batch size
against config.pbtxt): an empty or over-long prompt, ids outside the vocabulary, a bad parameter
(parameters that are not UTF-8 too) or too many tokens gets an INVALID_ARG error response (HTTP 400)
for that request alone, and the others of the same execution are answered normally. Nothing a
client sends can raise out of `execute`. (Bodies Triton's HTTP frontend refuses itself never get
here; the README's serving section lists them.)

Batching: requests of one execution whose prompts (ids) have the same length are run as one batch
(the model has no padding mask); generate also groups by temperature, and a seeded request runs alone.
A generate batch decodes to the longest max_tokens of its rows and cuts each row to its own.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

try:  # present inside the Triton stub only; the pure helpers below are importable without it
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - exercised in-process by tests
    pb_utils = None

GENERATE_PARAMS = {"max_tokens", "temperature", "seed"}
MAX_BYTES_PER_TOKEN = 64  # a prompt longer than this many bytes per block_size token is refused unread


class RequestError(ValueError):
    """A request the model refuses; becomes an INVALID_ARG error response (HTTP 400)."""


def generate_params(raw: str | dict | None, default_tokens: int, limit: int) -> tuple[int, float, int | None]:
    """(max_tokens, temperature, seed) of a generate request's parameters (a JSON string from the
    stub, or a dict); unknown keys, wrong types and out-of-range values raise RequestError."""
    params = json.loads(raw) if isinstance(raw, str) else dict(raw or {})
    unknown = sorted(set(params) - GENERATE_PARAMS)
    if unknown:
        raise RequestError(f"unknown request parameter(s) {unknown}; known: {sorted(GENERATE_PARAMS)}")
    max_tokens = params.get("max_tokens", default_tokens)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise RequestError(f"max_tokens must be an integer, got {max_tokens!r}")
    if not 1 <= max_tokens <= limit:
        raise RequestError(f"max_tokens {max_tokens} is outside 1..{limit}")
    temperature = params.get("temperature", 0.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise RequestError(f"temperature must be a number, got {temperature!r}")
    if not 0.0 <= float(temperature) <= 100.0 or temperature != temperature:
        raise RequestError(f"temperature {temperature} is outside [0, 100]")
    seed = params.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise RequestError(f"seed must be a non-negative integer, got {seed!r}")
    return max_tokens, float(temperature), seed


def text_ids(tok, text: str) -> list[int]:
    """How the generate model reads a prompt's text: as it is, or, for a model whose tokenizer has a
    chat template (an imported one), as the user's turn of a chat, as a chat endpoint does. serve.check's
    in-process reference reads its probes the same way."""
    return tok.prompt_ids(text) if getattr(tok, "chat_template", None) else tok.encode(text)


def prompt_ids(row: object, tok, block_size: int, max_tokens: int) -> list[int]:
    """Token ids of one UTF-8 prompt (bytes), checked to leave room for max_tokens in block_size."""
    if not isinstance(row, (bytes, bytearray, np.bytes_)):
        raise RequestError(f"text_input must be bytes (TYPE_STRING), got {type(row).__name__}")
    if len(row) > MAX_BYTES_PER_TOKEN * block_size:  # refuse before paying for tokenization
        raise RequestError(f"text_input of {len(row)} bytes cannot fit the model's block_size {block_size}")
    try:
        text = bytes(row).decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(f"text_input is not valid UTF-8: {err}") from None
    ids = text_ids(tok, text)
    if not ids:
        raise RequestError("text_input is empty (the model needs at least one prompt token)")
    if len(ids) + max_tokens > block_size:
        raise RequestError(f"prompt of {len(ids)} tokens + max_tokens {max_tokens} exceeds the model's "
                           f"block_size {block_size}")
    return ids


def score_ids(array: np.ndarray, vocab_size: int, block_size: int) -> np.ndarray:
    """The (B, T) int64 ids of a score request, checked: 2 <= T <= block_size, ids in the vocabulary."""
    if array.dtype != np.int64 or array.ndim != 2:
        raise RequestError(f"input_ids must be INT64 of shape [batch, tokens], got {array.dtype} {list(array.shape)}")
    T = array.shape[1]
    if not 2 <= T <= block_size:
        raise RequestError(f"input_ids has {T} tokens; the model scores 2..{block_size} (block_size)")
    if array.size and (array.min() < 0 or array.max() >= vocab_size):
        raise RequestError(f"input_ids holds ids outside 0..{vocab_size - 1}")
    return array


def score_batch(model, ids: np.ndarray) -> np.ndarray:
    """Per-token log-probabilities (B, T-1) float32 of ids (B, T): log p(ids[t] | ids[:t])."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(ids))
    with torch.inference_mode():
        logits, _ = model(x)  # (B, T, V)
        logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
        return logp.gather(-1, x[:, 1:, None])[..., 0].numpy()  # (B, T-1)


def generate_batch(model, tok, rows: list[list[int]], max_tokens: list[int], temperature: float,
                   seed: int | None) -> list[str]:
    """Continuations of same-length prompts `rows`, each cut to its own max_tokens and its first eos."""
    import torch

    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    idx = torch.tensor(rows, dtype=torch.long)  # (B, T)
    out = model.generate(idx, max(max_tokens), temperature=temperature, eos_id=tok.eos_ids, generator=gen)
    return [tok.decode(tok.until_eos(out[i, idx.size(1): idx.size(1) + n].tolist())) for i, n in enumerate(max_tokens)]


class TritonPythonModel:
    """Triton's python-backend entry: initialize once per instance, execute per batch of requests."""

    def initialize(self, args: dict) -> None:
        import torch

        from components.model.folder import load_model

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.kind = params["kind"]
        self.max_batch = int(config.get("max_batch_size", 0)) or 1
        self.default_tokens = int(params.get("max_tokens_default", 32))
        self.limit = int(params.get("max_tokens_limit", 256))
        threads = int(params.get("torch_threads", 0))
        if threads > 0:
            torch.set_num_threads(threads)
        folder = Path(args["model_repository"]) / args["model_version"] / "model_folder"
        self.model, self.tok = load_model(folder)  # raises on a broken folder: this version fails to load
        self.cfg = self.model.cfg
        self.log = pb_utils.Logger
        self.log.log_info(f"{config['name']} version {args['model_version']} loaded from {folder} "
                          f"(pid {os.getpid()}, Python {sys.version.split()[0]} at {sys.prefix}, "
                          f"torch {torch.__version__}, {torch.get_num_threads()} threads)")

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        try:
            if self.kind == "generate":
                self._generate(requests, responses)
            else:
                self._score(requests, responses)
        except Exception as err:  # a bug, not a bad request: answer every open request, keep serving
            self.log.log_error(f"{self.kind}: execution failed: {err!r}")
            for i, r in enumerate(responses):
                if r is None:
                    responses[i] = self._error(f"internal error: {err!r}", internal=True)
        return responses

    # ---- the two models --------------------------------------------------------------------

    def _generate(self, requests: list, responses: list) -> None:
        groups: dict[tuple, list[tuple[int, int, list[int], int]]] = {}
        total = 0
        for i, request in enumerate(requests):
            try:
                max_tokens, temperature, seed = generate_params(self._parameters(request), self.default_tokens,
                                                                self.limit)
                array = self._input(request, "text_input")
                if array.ndim != 2 or array.shape[1] != 1:
                    raise RequestError(f"text_input must have shape [batch, 1], got {list(array.shape)}")
                total += array.shape[0]
                if total > self.max_batch:
                    raise RequestError(f"more than max_batch_size {self.max_batch} rows in one execution")
                for j, row in enumerate(array[:, 0]):
                    ids = prompt_ids(row, self.tok, self.cfg.block_size, max_tokens)
                    key = (len(ids), temperature, (i, seed) if temperature > 0 and seed is not None else None)
                    groups.setdefault(key, []).append((i, j, ids, max_tokens))
            except RequestError as err:
                responses[i] = self._error(str(err))
        outputs: dict[int, dict[int, str]] = {}
        for (_, temperature, seeded), members in groups.items():
            live = [m for m in members if responses[m[0]] is None]
            if not live:
                continue
            texts = generate_batch(self.model, self.tok, [m[2] for m in live], [m[3] for m in live],
                                   temperature, seeded[1] if seeded else None)
            for (i, j, _, _), text in zip(live, texts, strict=True):
                outputs.setdefault(i, {})[j] = text
        for i in range(len(requests)):
            if responses[i] is None:
                rows = outputs.get(i, {})
                out = np.array([[rows[j].encode("utf-8")] for j in sorted(rows)], dtype=np.object_)
                responses[i] = pb_utils.InferenceResponse([pb_utils.Tensor("text_output", out)])

    def _score(self, requests: list, responses: list) -> None:
        groups: dict[int, list[tuple[int, np.ndarray]]] = {}
        total = 0
        for i, request in enumerate(requests):
            try:
                params = self._parameters(request)
                if json.loads(params):
                    raise RequestError(f"the score model takes no request parameters, got {params[:80]}")
                ids = score_ids(self._input(request, "input_ids"), self.cfg.vocab_size, self.cfg.block_size)
                total += ids.shape[0]
                if total > self.max_batch:
                    raise RequestError(f"more than max_batch_size {self.max_batch} rows in one execution")
                groups.setdefault(ids.shape[1], []).append((i, ids))
            except RequestError as err:
                responses[i] = self._error(str(err))
        for members in groups.values():
            logp = score_batch(self.model, np.concatenate([ids for _, ids in members]))  # (sum B, T-1)
            start = 0
            for i, ids in members:
                part = logp[start: start + ids.shape[0]]
                start += ids.shape[0]
                responses[i] = pb_utils.InferenceResponse([pb_utils.Tensor("logprobs", part.astype(np.float32))])

    # ---- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _parameters(request) -> str:
        """The request's parameters, a JSON object as text (the stub decodes the bytes a client sent)."""
        try:
            return request.parameters() or "{}"
        except UnicodeDecodeError:
            raise RequestError("request parameters are not valid UTF-8") from None

    @staticmethod
    def _input(request, name: str) -> np.ndarray:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            raise RequestError(f"missing input {name!r}")
        return tensor.as_numpy()

    @staticmethod
    def _error(message: str, internal: bool = False):
        code = pb_utils.TritonError.INTERNAL if internal else pb_utils.TritonError.INVALID_ARG
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))

    def finalize(self) -> None:
        self.model = None
