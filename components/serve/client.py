"""Requests to the two served models through tritonclient, the same over HTTP and gRPC.

    client = server.client("grpc")                     # or tritonclient.{http,grpc}.InferenceServerClient(url)
    texts = generate(client, "distillery_generate", ["1 + 2 ="], max_tokens=16)   # greedy
    logp = score(client, "distillery_score", [[5, 9, 2, 7]])                       # (1, 3) float32

`max_tokens`, `temperature` and `seed` travel as Triton request parameters (`parameters=` of
tritonclient's infer, both protocols: a JSON object over HTTP, InferParameter over gRPC); the
model reads them with `request.parameters()`. An omitted one takes the model's default.
"""

from __future__ import annotations

import numpy as np


def protocol_of(client) -> str:
    """"http" or "grpc": which tritonclient module `client` comes from."""
    module = type(client).__module__
    if module.startswith("tritonclient.grpc"):
        return "grpc"
    if module.startswith("tritonclient.http"):
        return "http"
    raise TypeError(f"{type(client).__name__} is not a tritonclient InferenceServerClient")


def _module(client):
    if protocol_of(client) == "grpc":
        import tritonclient.grpc as mod
    else:
        import tritonclient.http as mod
    return mod


def text_input(client, prompts: list[str]):
    """The `text_input` tensor (BYTES, [B, 1]) of UTF-8 prompts."""
    mod = _module(client)
    data = np.array([[p.encode("utf-8")] for p in prompts], dtype=np.object_)
    tensor = mod.InferInput("text_input", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    return tensor


def ids_input(client, ids) -> object:
    """The `input_ids` tensor (INT64, [B, T]) of equal-length rows of token ids."""
    mod = _module(client)
    data = np.asarray(ids, dtype=np.int64)
    tensor = mod.InferInput("input_ids", list(data.shape), "INT64")
    tensor.set_data_from_numpy(data)
    return tensor


def generate(client, model: str, prompts: list[str], max_tokens: int | None = None, temperature: float = 0.0,
             seed: int | None = None, version: int | str = "", timeout: float | None = None) -> list[str]:
    """Continuations of `prompts` (one request, B rows) from the generate model; raises
    tritonclient.utils.InferenceServerException on an error response."""
    params: dict = {"temperature": float(temperature)}
    if max_tokens is not None:
        params["max_tokens"] = int(max_tokens)
    if seed is not None:
        params["seed"] = int(seed)
    kwargs = {"client_timeout": timeout} if timeout is not None and protocol_of(client) == "grpc" else {}
    result = client.infer(model, [text_input(client, prompts)], model_version=str(version), parameters=params, **kwargs)
    return [row[0].decode("utf-8") for row in result.as_numpy("text_output")]


def score(client, model: str, ids, version: int | str = "", timeout: float | None = None) -> np.ndarray:
    """Per-token log-probabilities (B, T-1) float32 of equal-length rows `ids` (B, T)."""
    kwargs = {"client_timeout": timeout} if timeout is not None and protocol_of(client) == "grpc" else {}
    result = client.infer(model, [ids_input(client, ids)], model_version=str(version), **kwargs)
    return result.as_numpy("logprobs")
