"""generate and score through tritonclient over HTTP and gRPC against the real server: answers
equal the in-process model, and malformed requests get 4xx errors while the server keeps serving."""

from __future__ import annotations

import contextlib
import json
import random
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from components.serve import client as calls
from components.model.folder import load_model

GEN, SCORE = "distillery_generate", "distillery_score"
PROTOCOLS = ("http", "grpc")


@contextlib.contextmanager
def one_thread():
    """torch on one thread for the tiny in-process model (many threads only contend on 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(model_folder):
    """The in-process answers of the model folder the session's server serves as version 1."""
    model, tok = load_model(model_folder)

    def generate(prompt: str, max_tokens: int) -> str:
        ids = torch.tensor([tok.encode(prompt)])
        with one_thread():
            new = model.generate(ids, max_tokens, temperature=0.0, eos_id=tok.eos_id)[0, ids.size(1):].tolist()
        return tok.decode(new[: new.index(tok.eos_id)] if tok.eos_id in new else new)

    def score(ids) -> np.ndarray:
        x = torch.tensor(ids)
        with one_thread(), torch.inference_mode():
            logits, _ = model(x)
            return F.log_softmax(logits[:, :-1].float(), -1).gather(-1, x[:, 1:, None])[..., 0].numpy()

    return {"model": model, "tok": tok, "generate": generate, "score": score}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_generate_and_score_match_in_process(server, reference, protocol):
    client = server.client(protocol)
    try:
        prompts = ["1 + 2 =", "What is 3 * 4?", "hello"]
        for max_tokens in (1, 5, 12):
            got = [calls.generate(client, GEN, [p], max_tokens=max_tokens) for p in prompts]
            assert got == [[reference["generate"](p, max_tokens)] for p in prompts]
        # several rows in one request (same length: one batch; different: grouped in the backend)
        rows = ["1 + 2 =", "3 + 4 =", "hello world"]
        assert calls.generate(client, GEN, rows, max_tokens=6) == [reference["generate"](p, 6) for p in rows]
        assert calls.generate(client, GEN, ["1 + 2 ="]) == [reference["generate"]("1 + 2 =", 8)]  # default 8
        tok = reference["tok"]
        ids = [tok.encode("12 * 3 = 36 #### 36")]
        np.testing.assert_allclose(calls.score(client, SCORE, ids), reference["score"](ids), atol=1e-5)
        batch = np.random.default_rng(0).integers(0, tok.vocab_size, (3, 9))
        out = calls.score(client, SCORE, batch, version=1)
        assert out.shape == (3, 8) and out.dtype == np.float32
        np.testing.assert_allclose(out, reference["score"](batch), atol=1e-5)
    finally:
        client.close()


def test_sampling_parameters_reach_the_model(server):
    client, http = server.client("grpc"), server.client("http")
    try:
        a = calls.generate(client, GEN, ["1 + 2 ="], max_tokens=12, temperature=1.5, seed=11)
        b = calls.generate(http, GEN, ["1 + 2 ="], max_tokens=12, temperature=1.5, seed=11)
        c = calls.generate(client, GEN, ["1 + 2 ="], max_tokens=12, temperature=1.5, seed=12)
        greedy = calls.generate(client, GEN, ["1 + 2 ="], max_tokens=12)
        assert a == b and a != c and len({a[0], c[0], greedy[0]}) == 3
    finally:
        client.close()
        http.close()


def _input(protocol, name, shape, datatype, data):
    mod = httpclient if protocol == "http" else grpcclient
    tensor = mod.InferInput(name, list(shape), datatype)
    tensor.set_data_from_numpy(data)
    return tensor


def _bad_requests(block: int, vocab: int, max_batch: int) -> dict:
    """name -> (model, [(input name, shape, datatype, data)], parameters)."""

    def ids(*shape, value=1, dtype=np.int64, datatype="INT64", name="input_ids"):
        return [(name, shape, datatype, np.full(shape, value, dtype=dtype))]

    def text(*rows, datatype="BYTES"):
        data = np.array([[r] for r in rows], dtype=np.object_)
        return [("text_input", data.shape, datatype, data)]

    pair = np.array([[b"a", b"b"]], dtype=np.object_)
    return {
        "score: wrong dtype FP32": (SCORE, ids(1, 4, dtype=np.float32, datatype="FP32"), None),
        "score: wrong dtype INT32": (SCORE, ids(1, 4, dtype=np.int32, datatype="INT32"), None),
        "score: wrong rank": (SCORE, ids(1, 2, 3), None),
        "score: missing input": (SCORE, [], None),
        "score: unknown input name": (SCORE, ids(1, 4, name="tokens"), None),
        "score: extra input": (SCORE, ids(1, 4) + ids(1, 1, name="x"), None),
        "score: more tokens than block_size": (SCORE, ids(1, block + 1), None),
        "score: a single token": (SCORE, ids(1, 1), None),
        "score: id outside the vocabulary": (SCORE, ids(1, 3, value=vocab), None),
        "score: negative id": (SCORE, ids(1, 3, value=-1), None),
        "score: batch above max_batch_size": (SCORE, ids(max_batch + 1, 3), None),
        "score: a request parameter": (SCORE, ids(1, 3), {"max_tokens": 3}),
        "generate: wrong dtype": (GEN, ids(1, 1, name="text_input"), None),
        "generate: wrong shape": (GEN, [("text_input", (1, 2), "BYTES", pair)], None),
        "generate: missing input": (GEN, [], None),
        "generate: empty prompt": (GEN, text(b""), None),
        "generate: invalid UTF-8": (GEN, text(b"\xff\xfe"), None),
        "generate: prompt longer than block_size": (GEN, text(b"9 " * block), None),
        "generate: a megabyte prompt": (GEN, text(b"x" * 1_000_000), None),
        "generate: too many max_tokens": (GEN, text(b"hi"), {"max_tokens": 33}),
        "generate: prompt + max_tokens over block_size": (GEN, text(b"9 " * 40), {"max_tokens": 32}),
        "generate: max_tokens not an integer": (GEN, text(b"hi"), {"max_tokens": "4"}),
        "generate: temperature not a number": (GEN, text(b"hi"), {"temperature": "hot"}),
        "generate: unknown parameter": (GEN, text(b"hi"), {"max_token": 4}),
        "generate: batch above max_batch_size": (GEN, text(*[b"hi"] * (max_batch + 1)), None),
    }


def test_malformed_requests_get_4xx_and_the_server_keeps_serving(server, reference, export_cfg):
    cfg = reference["model"].cfg
    cases = _bad_requests(cfg.block_size, cfg.vocab_size, export_cfg.max_batch_size)
    for protocol in PROTOCOLS:
        client = server.client(protocol)
        try:
            for name, (model, inputs, params) in cases.items():
                with pytest.raises(InferenceServerException) as err:
                    client.infer(model, [_input(protocol, *i) for i in inputs], parameters=params)
                want = "400" if protocol == "http" else "StatusCode.INVALID_ARGUMENT"
                assert err.value.status() == want, f"{name} over {protocol}: {err.value}"
            assert calls.generate(client, GEN, ["hello"], max_tokens=3) == [reference["generate"]("hello", 3)]
        finally:
            client.close()
    assert server.is_alive()


def test_raw_http_gets_status_400(server):
    """The HTTP status itself (not the client's reading of it), with a plain JSON request."""
    body = {"inputs": [{"name": "input_ids", "shape": [1, 3], "datatype": "FP32", "data": [1.0, 2.0, 3.0]}]}
    bad_param = {"parameters": {"max_tokens": 10_000},
                 "inputs": [{"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": ["hi"]}]}
    for model, payload in ((SCORE, body), (GEN, bad_param), (SCORE, {"inputs": []})):
        req = urllib.request.Request(f"http://{server.http_url}/v2/models/{model}/infer",
                                     data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=30)
        assert err.value.code == 400, err.value.read()
    ok = {"inputs": [{"name": "input_ids", "shape": [1, 3], "datatype": "INT64", "data": [5, 6, 7]}]}
    req = urllib.request.Request(f"http://{server.http_url}/v2/models/{SCORE}/infer", data=json.dumps(ok).encode())
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200 and json.loads(r.read())["outputs"][0]["shape"] == [1, 2]


def test_a_thousand_malformed_requests_mixed_with_valid_ones(server, reference, export_cfg):
    """1,000 malformed score requests interleaved with 250 valid ones from 8 concurrent gRPC clients:
    every valid one is answered correctly, every malformed one is refused, nothing crashes."""
    cfg = reference["model"].cfg
    cases = _bad_requests(cfg.block_size, cfg.vocab_size, export_cfg.max_batch_size)
    bad = [case for case in cases.values() if case[0] == SCORE]
    rng = random.Random(0)
    jobs = [("bad", bad[i % len(bad)]) for i in range(1000)]
    jobs += [("ok", np.array([[rng.randrange(cfg.vocab_size) for _ in range(rng.choice((2, 5, 9)))]]))
             for _ in range(250)]
    rng.shuffle(jobs)
    valid = [ids for kind, ids in jobs if kind == "ok"]
    want = {id(ids): reference["score"](ids) for ids in valid}
    results: dict[int, object] = {}
    refused = [0]
    lock = threading.Lock()
    queue = iter(jobs)

    def worker():
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            while True:
                with lock:
                    job = next(queue, None)
                if job is None:
                    return
                kind, payload = job
                if kind == "ok":
                    try:
                        out = calls.score(client, SCORE, payload)
                    except InferenceServerException as err:
                        out = err
                    with lock:
                        results[id(payload)] = out
                else:
                    model, inputs, params = payload
                    try:
                        client.infer(model, [_input("grpc", *i) for i in inputs], parameters=params)
                    except InferenceServerException as err:
                        if err.status() == "StatusCode.INVALID_ARGUMENT":
                            with lock:
                                refused[0] += 1
        finally:
            client.close()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert refused[0] == 1000
    assert len(results) == 250
    for ids in valid:
        out = results[id(ids)]
        assert isinstance(out, np.ndarray), f"valid request {ids.tolist()} failed: {out}"
        np.testing.assert_allclose(out, want[id(ids)], atol=1e-4)
    assert server.is_alive()
    client = server.client("http")
    assert client.is_model_ready(SCORE)
    client.close()
