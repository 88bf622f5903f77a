"""Raw HTTP bodies that are not well-formed inference requests, against the real server.

Triton's own HTTP frontend parses the JSON before our model sees a request, and answers some of
them itself: each answer is pinned here exactly (status and message), as the README's serving
section lists them, so a Triton upgrade that changes one fails this file. Every body that reaches
our model gets 400, never 500 (a table, and randomly mutated valid bodies); the server keeps
answering valid requests correctly; and the two bodies that still kill tritonserver 2.51 over HTTP
(a huge declared shape, data nested 100,000 deep) are pinned, each on a server of its own.
"""

from __future__ import annotations

import http.client
import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tritonclient.grpc as grpcclient
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

from components.model.folder import load_model
from components.serve.config import ServerConfig
from components.serve.server import TritonServer

GEN, SCORE = "distillery_generate", "distillery_score"
IDS = [5, 6, 7]
OK_SCORE = {"inputs": [{"name": "input_ids", "shape": [1, 3], "datatype": "INT64", "data": IDS}]}
OK_GEN = {"inputs": [{"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": ["1 + 2 ="]}],
          "parameters": {"max_tokens": 4}}
OK_GENERATE = {"text_input": "1 + 2 =", "max_tokens": 4}  # generate extension: other keys are parameters
# What Triton 2.51's HTTP frontend answers 500 with: its JSON reader's errors are INTERNAL there.
TRITON_PARSER_500 = ("failed to parse the request JSON buffer: ", "Unable to parse ", "failed to get request params",
                     "attempt to get members for non-object", "Expected JSON object for keyword: ")


def post(server, path: str, body: bytes, headers: dict | None = None) -> tuple[int, str]:
    """(HTTP status, the error message, or the whole body when there is no "error") of one POST."""
    conn = http.client.HTTPConnection(server.cfg.host, server.http_port, timeout=60)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        text = response.read().decode("utf-8", errors="replace")  # Triton echoes invalid UTF-8 as it came
    finally:
        conn.close()
    try:
        return response.status, json.loads(text).get("error", text)
    except (ValueError, AttributeError):
        return response.status, text


def js(obj) -> bytes:
    return json.dumps(obj).encode()


def _with(input_: dict, **change) -> bytes:
    """OK_SCORE with its one input changed (a value of None drops that key)."""
    tensor = {k: v for k, v in {**input_, **change}.items() if v is not None}
    return js({"inputs": [tensor]})


SCORE_INPUT = OK_SCORE["inputs"][0]
GEN_INPUT = OK_GEN["inputs"][0]
MISSING = "Unable to parse '{0}': attempt to access non-existing object member '{0}'"
SHAPE_MISMATCH = "Unable to parse 'data': Shape does not match true shape of 'data' field"
NOT_INT = "Unable to parse 'data': attempt to access JSON non-signed-integer as signed-integer"
NO_DATA = ("Input must set only one of the following fields: 'data', 'binary_data_size' in 'parameters', "
           "'shared_memory_region' in 'parameters'. But no field is set")
BAD_PARAM = "parameter '{}' has invalid type. It should be either 'int', 'bool', or 'string'."
HEADER = "Inference-Header-Content-Length"

# name -> (model, endpoint, body, extra headers, status, error message). Who answers: "triton" for
# its HTTP frontend or core, "ours" for components/serve/triton_model.py.
CASES = {
    # -- Triton's HTTP frontend, 500 (a client error it reports as INTERNAL) --------------------
    "not JSON": (SCORE, "infer", b"hello there", None, 500,
                 "failed to parse the request JSON buffer: Invalid value. at 0"),
    "truncated JSON": (SCORE, "infer", js(OK_SCORE)[:-5], None, 500,
                       "failed to parse the request JSON buffer: Invalid value. at 87"),
    "lone surrogate escape": (GEN, "infer", js(OK_GEN).replace(b"1 + 2 =", b"\\ud800"), None, 500,
                           "failed to parse the request JSON buffer: The surrogate pair in string is invalid. at 83"),
    "a JSON array": (SCORE, "infer", js([SCORE_INPUT]), None, 500, MISSING.format("inputs")),
    "a JSON string": (SCORE, "infer", js("inputs"), None, 500, MISSING.format("inputs")),
    "JSON null": (SCORE, "infer", b"null", None, 500, MISSING.format("inputs")),
    "no inputs key": (SCORE, "infer", js({"parameters": {}}), None, 500, MISSING.format("inputs")),
    "inputs not a list": (SCORE, "infer", js({"inputs": SCORE_INPUT}), None, 500,
                          "Unable to parse 'inputs': attempt to access JSON non-array as array"),
    "input without name": (SCORE, "infer", _with(SCORE_INPUT, name=None), None, 500, MISSING.format("name")),
    "input without shape": (SCORE, "infer", _with(SCORE_INPUT, shape=None), None, 500, MISSING.format("shape")),
    "input without datatype": (SCORE, "infer", _with(SCORE_INPUT, datatype=None), None, 500,
                               MISSING.format("datatype")),
    "name not a string": (SCORE, "infer", _with(SCORE_INPUT, name=5), None, 500,
                          "Unable to parse 'name': attempt to access JSON non-string as string"),
    "shape not a list": (SCORE, "infer", _with(SCORE_INPUT, shape="1,3"), None, 500,
                         "Unable to parse 'shape': attempt to access JSON non-array as array"),
    "negative dimension": (SCORE, "infer", _with(SCORE_INPUT, shape=[1, -3]), None, 500,
                           "Unable to parse 'shape': attempt to access JSON non-unsigned-integer as unsigned-integer"),
    "float dimension": (SCORE, "infer", _with(SCORE_INPUT, shape=[1.0, 3.0]), None, 500,
                        "Unable to parse 'shape': attempt to access JSON non-unsigned-integer as unsigned-integer"),
    "data shorter than shape": (SCORE, "infer", _with(SCORE_INPUT, data=[5, 6]), None, 500, SHAPE_MISMATCH),
    "data longer than shape": (SCORE, "infer", _with(SCORE_INPUT, data=[5, 6, 7, 8]), None, 500, SHAPE_MISMATCH),
    "strings for INT64": (SCORE, "infer", _with(SCORE_INPUT, data=["5", "6", "7"]), None, 500, NOT_INT),
    "floats for INT64": (SCORE, "infer", _with(SCORE_INPUT, data=[5.5, 6.0, 7.0]), None, 500, NOT_INT),
    "integer beyond int64": (SCORE, "infer", _with(SCORE_INPUT, data=[2 ** 70, 6, 7]), None, 500, NOT_INT),
    "data not a list": (SCORE, "infer", _with(SCORE_INPUT, data={"a": 1}), None, 500,
                        "Unable to parse 'data': attempt to access JSON non-array as array"),
    "numbers for BYTES": (GEN, "infer", _with(GEN_INPUT, data=[5]), None, 500,
                          "Unable to parse JSON bytes array: attempt to access JSON non-string as string"),
    "parameters not an object": (SCORE, "infer", js({**OK_SCORE, "parameters": [1]}), None, 500,
                                 "failed to get request params.: attempt to get members for non-object"),
    "outputs not a list": (SCORE, "infer", js({**OK_SCORE, "outputs": "logprobs"}), None, 500,
                           "Unable to parse 'outputs': attempt to access JSON non-array as array"),
    "id not a string": (SCORE, "infer", js({**OK_SCORE, "id": 5}), None, 500,
                        "Unable to parse 'id': attempt to access JSON non-string as string"),
    f"{HEADER} shorter than the JSON": (SCORE, "infer", js(OK_SCORE), {HEADER: "5"}, 500,
                                        "failed to parse the request JSON buffer: Missing a closing quotation "
                                        "mark in string. at 5"),
    "generate: not JSON": (GEN, "generate", b"nope", None, 500,
                           "failed to parse the request JSON buffer: Invalid value. at 1"),
    "generate: empty body": (GEN, "generate", b"", None, 500,
                             "failed to parse the request JSON buffer: The document is empty. at 0"),
    "generate: a JSON array": (GEN, "generate", b"[1]", None, 500, "attempt to get members for non-object"),
    "generate: parameters not an object": (GEN, "generate", js({**OK_GENERATE, "parameters": None}), None, 500,
                                           "Expected JSON object for keyword: 'parameters': attempt to access JSON "
                                           "non-object as object"),
    "generate: text_input a number": (GEN, "generate", js({"text_input": 5}), None, 500,
                                      "Unable to parse JSON bytes array: attempt to access JSON non-string as string"),
    # -- Triton's HTTP frontend or core, 400 --------------------------------------------------
    "an input that is not an object": (SCORE, "infer", js({"inputs": [1]}), None, 400, NO_DATA),
    "input without data": (SCORE, "infer", _with(SCORE_INPUT, data=None), None, 400, NO_DATA),
    "unknown datatype": (SCORE, "infer", _with(SCORE_INPUT, datatype="INT65"), None, 400,
                         "invalid datatype for input input_ids"),
    "lowercase datatype": (SCORE, "infer", _with(SCORE_INPUT, datatype="int64"), None, 400,
                           "invalid datatype for input input_ids"),
    "unknown input name, invalid UTF-8": (SCORE, "infer", _with(SCORE_INPUT).replace(b"input_ids", b"input_ids\xff"),
                                          None, 400,
                                          f"unexpected inference input 'input_ids\ufffd' for model '{SCORE}'"),
    "parameter an object": (SCORE, "infer", js({**OK_SCORE, "parameters": {"a": {"b": 1}}}), None, 400,
                            BAD_PARAM.format("a")),
    "parameter null": (GEN, "infer", js({**OK_GEN, "parameters": {"max_tokens": None}}), None, 400,
                       BAD_PARAM.format("max_tokens")),
    "unknown output": (SCORE, "infer", js({**OK_SCORE, "outputs": [{"name": "nope"}]}), None, 400,
                       f"unexpected inference output 'nope' for model '{SCORE}'"),
    "no batch dimension": (SCORE, "infer", _with(SCORE_INPUT, shape=[3]), None, 400,
                           f"[request id: <id_unknown>] unexpected shape for input 'input_ids' for model '{SCORE}'. "
                           "Expected [-1,-1], got [3]. NOTE: Setting a non-zero max_batch_size in the model config "
                           "requires a batch dimension to be prepended to each input shape. If you want to specify "
                           "the full shape including the batch dim in your input dims config, try setting "
                           "max_batch_size to zero. See the model configuration docs for more info on "
                           "max_batch_size."),
    "batch of zero": (SCORE, "infer", _with(SCORE_INPUT, shape=[0, 3], data=[]), None, 400,
                      f"[request id: <id_unknown>] input byte size mismatch for input 'input_ids' for model "
                      f"'{SCORE}'. Expected 24, got 0"),
    f"{HEADER} longer than the body": (SCORE, "infer", js(OK_SCORE), {HEADER: "10000"}, 400,
                                       "inference header size should be in range (0, 92), got: 10000"),
    f"{HEADER} not a number": (SCORE, "infer", js(OK_SCORE), {HEADER: "abc"}, 400,
                               f"[request id: <id_unknown>] input byte size mismatch for input 'raw_input' for "
                               f"model '{SCORE}'. Expected 88, got 92"),
    "binary_data_size beyond the body": (
        SCORE, "infer",
        js({"inputs": [{"name": "input_ids", "shape": [1, 3], "datatype": "INT64",
                        "parameters": {"binary_data_size": 100}}]}) + b"\x01" * 24,
        "binary", 400, f"unexpected size for input 'input_ids', expecting 76 additional bytes for model '{SCORE}'"),
    "generate: no text_input": (GEN, "generate", js({"prompt": "hi"}), None, 400,
                                f"[request id: <id_unknown>] expected 1 inputs but got 0 inputs for model '{GEN}'. "
                                "Got input(s) [], but missing required input(s) ['text_input']. Please provide all "
                                "required input(s)."),
    # -- our model, 400 -------------------------------------------------------------------------
    "empty body": (SCORE, "infer", b"", None, 400, "input_ids has 0 tokens; the model scores 2..64 (block_size)"),
    "invalid UTF-8 prompt": (GEN, "infer", js(OK_GEN).replace(b"1 + 2 =", b"\xff\xfe"), None, 400,
                             "text_input is not valid UTF-8: 'utf-8' codec can't decode byte 0xff in position 0: "
                             "invalid start byte"),
    "max_tokens a float": (GEN, "infer", js({**OK_GEN, "parameters": {"max_tokens": 2.5}}), None, 400,
                           "max_tokens must be an integer, got 2.5"),
    "max_tokens beyond int64": (GEN, "infer", js({**OK_GEN, "parameters": {"max_tokens": 2 ** 70}}), None, 400,
                                "max_tokens must be an integer, got 1.1805916207174113e+21"),
    "max_tokens true": (GEN, "infer", js({**OK_GEN, "parameters": {"max_tokens": True}}), None, 400,
                        "max_tokens must be an integer, got True"),
    "temperature NaN": (GEN, "infer", js(OK_GEN).replace(b'"max_tokens": 4', b'"temperature": NaN'), None, 400,
                        "temperature nan is outside [0, 100]"),
    "seed beyond int64": (GEN, "infer", js({**OK_GEN, "parameters": {"temperature": 1.0, "seed": 2 ** 64 - 1}}),
                          None, 400, "seed must be a non-negative integer, got 1.8446744073709552e+19"),
    "parameter name not UTF-8": (GEN, "infer", js(OK_GEN).replace(b'"max_tokens"', b'"\x80max_tokens"'), None, 400,
                                 "request parameters are not valid UTF-8"),
    "parameter value not UTF-8": (SCORE, "infer", js({**OK_SCORE, "parameters": {"a": "b"}}).replace(b'"b"', b'"\xff"'),
                                  None, 400, "request parameters are not valid UTF-8"),
    "generate: max_tokens a string": (GEN, "generate", js({"text_input": "hi", "max_tokens": "4"}), None, 400,
                                      "max_tokens must be an integer, got '4'"),
    "generate: invalid UTF-8 prompt": (GEN, "generate", b'{"text_input": "\xff"}', None, 400,
                                       "text_input is not valid UTF-8: 'utf-8' codec can't decode byte 0xff in "
                                       "position 0: invalid start byte"),
}


@pytest.fixture(scope="module")
def answers(server, model_folder):
    """Valid requests and their right answers: score against the in-process model, generate as the
    server answered it before any malformed body (greedy, so it must not change)."""
    model, _ = load_model(model_folder)
    with torch.inference_mode():
        logits, _ = model(torch.tensor([IDS]))
        want = F.log_softmax(logits[:, :-1].float(), -1).gather(-1, torch.tensor([IDS])[:, 1:, None])[..., 0]
    return {"score": want.numpy(), "generate": output(server, GEN, OK_GEN)}


def output(server, model: str, request: dict) -> list:
    """The data of the one output of a valid request, over plain HTTP."""
    conn = http.client.HTTPConnection(server.cfg.host, server.http_port, timeout=60)
    try:
        conn.request("POST", f"/v2/models/{model}/infer", body=js(request))
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    assert response.status == 200, body
    return json.loads(body)["outputs"][0]["data"]


def assert_still_serving(server, answers) -> None:
    np.testing.assert_allclose(np.array([output(server, SCORE, OK_SCORE)]), answers["score"], atol=1e-5)
    assert output(server, GEN, OK_GEN) == answers["generate"]


@pytest.mark.parametrize("case", list(CASES))
def test_each_malformed_body_gets_the_documented_answer(server, answers, case):
    model, endpoint, body, headers, status, message = CASES[case]
    if headers == "binary":  # the JSON header's length, then 24 bytes of tensor data
        headers = {HEADER: str(len(body) - 24), "Content-Type": "application/octet-stream"}
    got = post(server, f"/v2/models/{model}/{endpoint}", body, headers)
    assert got == (status, message), f"{case}: Triton {got} (README and this table say {(status, message)})"
    assert_still_serving(server, answers)


def _mutations():
    """A valid body (infer, or the generate extension), then one change: cut short, a byte dropped or
    inserted (never a digit, so no declared shape can grow: see the killers below), a value replaced
    with small random JSON (at most 12 per dimension, 8 leaves), or a key dropped."""
    small = st.recursive(st.none() | st.booleans() | st.integers(-3, 12) | st.floats(allow_nan=False, width=32)
                         | st.text(max_size=6), lambda inner: st.lists(inner, max_size=4)
                         | st.dictionaries(st.sampled_from(["name", "shape", "datatype", "data", "max_tokens",
                                                            "parameters", "x"]), inner, max_size=3), max_leaves=8)
    non_digit = st.integers(0, 255).filter(lambda b: not 48 <= b <= 57).map(lambda b: bytes([b]))
    paths = [("inputs", 0, "name"), ("inputs", 0, "shape"), ("inputs", 0, "datatype"), ("inputs", 0, "data"),
             ("inputs", 0), ("inputs",), ("parameters",), ("parameters", "max_tokens"), ("text_input",),
             ("max_tokens",)]

    @st.composite
    def body(draw):
        endpoint, model, doc = draw(st.sampled_from([("infer", SCORE, OK_SCORE), ("infer", GEN, OK_GEN),
                                                     ("generate", GEN, OK_GENERATE)]))
        raw = js(doc)
        kind = draw(st.sampled_from(["cut", "drop", "insert", "replace", "delete"]))
        if kind in ("cut", "drop", "insert"):
            at = draw(st.integers(0, len(raw) - 1))
            raw = {"cut": raw[:at], "drop": raw[:at] + raw[at + 1:],
                   "insert": raw[:at] + draw(non_digit) + raw[at:]}[kind]
        else:
            doc = json.loads(raw)
            *parents, key = draw(st.sampled_from(paths))
            node = doc
            for p in parents:
                node = node[p] if isinstance(node, dict) and p in node or isinstance(node, list) else {}
            if kind == "replace":
                node[key] = draw(small)
            elif isinstance(node, dict):
                node.pop(key, None)
            raw = js(doc)
        return f"/v2/models/{model}/{endpoint}", raw

    return body()


@settings(max_examples=150, deadline=None)
@given(case=_mutations())
def test_mutated_bodies_never_get_a_500_from_our_model(server, answers, case):
    """Whatever the body, the answer is 200, 400 or one of Triton's documented parser 500s: our model
    never answers 500 (its "internal error"), and the server stays up."""
    path, body = case
    status, message = post(server, path, body)
    assert status in (200, 400, 500), (status, message, body)
    if status == 500:
        assert message.startswith(TRITON_PARSER_500), (message, body)
    if status != 200:
        assert not message.startswith("internal error"), (message, body)
    assert server.is_alive()


def test_the_server_still_answers_correctly_after_the_malformed_bodies(server, answers):
    assert_still_serving(server, answers)


def test_grpc_refuses_a_huge_declared_shape(server):
    """The body that kills the server over HTTP (below), over gRPC: the size is checked first."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    tensor = grpcclient.InferInput("input_ids", [1, 2 ** 40], "INT64")
    tensor._raw_content = np.array(IDS, dtype=np.int64).tobytes()  # the shape lies about the data
    try:
        with pytest.raises(InferenceServerException) as err:
            client.infer(SCORE, [tensor])
    finally:
        client.close()
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "Expected 8796093022208, got 24" in str(err.value)


DEEP = 100_000
KILLERS = {  # name -> (body, signal the server dies of)
    "huge declared shape": (js({"inputs": [{**SCORE_INPUT, "shape": [1, 2 ** 40]}]}), signal.SIGABRT),
    "data nested 100,000 deep": (js({"inputs": [{**SCORE_INPUT, "data": "X"}]}).replace(
        b'"X"', b"[" * DEEP + b"5" + b"]" * DEEP), signal.SIGSEGV),
}


@pytest.mark.parametrize("case", list(KILLERS))
def test_one_http_body_kills_tritonserver(repository, tmp_path, case):
    """Two bodies of a few hundred kilobytes at most that stop Triton 2.51 over HTTP, each on a server
    of its own: a huge declared shape (its HTTP frontend allocates shape x element size for JSON
    `data` before it reads the data, and dies on std::bad_alloc; any loaded model, any input name,
    any fixed-size datatype) and deeply nested `data` (its recursive reader runs out of stack).
    If this fails because the server survived, Triton fixed it: update the README's serving section."""
    body, sig = KILLERS[case]
    victim = TritonServer(repository, ServerConfig(startup_timeout_s=60), log_path=tmp_path / "log", load=(SCORE,))
    with victim:
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            post(victim, f"/v2/models/{SCORE}/infer", body)
        deadline = time.monotonic() + 30
        while victim.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not victim.is_alive(), f"tritonserver survived {case}: update the README"
        assert victim._proc.returncode == -sig, victim.log_tail()
    assert not list(Path("/dev/shm").glob(f"{victim.shm_prefix}*")), "the crashed server's shm regions were left"
