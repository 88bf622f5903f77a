"""`distillery submit` / `distillery schedule` against a stand-in for the KFP API server.

There is no Kubeflow here. `KfpStub` is a small HTTP server (http.server in a thread) that answers
only the KFP v2beta1 REST endpoints kfp.Client 2.17 calls for these commands (healthz, pipeline
list / upload / upload_version / versions, experiments, runs, recurring runs), keeps what it was
given in memory and records every request. It is a stand-in that lets the tests check what the
real kfp.Client sends (the uploaded package, the version a run points at, the cron trigger); it
is not a KFP backend: it runs nothing, checks no auth, validates no pipeline spec, and finishes a
run the moment it is asked about it (in the state the test sets).

    .venv/bin/python -m pytest -q tests/pipelines/test_submit.py
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import socket
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from components.config import ConfigError
from pipelines.cli import main
from pipelines.params import REPO_PARAMS, load_params
from pipelines.pipeline import compile_pipeline
from pipelines.submit import CRON_FIELDS, normalize_cron

API = "/apis/v2beta1"


class KfpStub:
    """The stand-in server: `requests` holds (method, path, query, headers, body) of every call."""

    def __init__(self):
        self.requests: list[dict] = []
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, dict] = {}
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.recurring: dict[str, dict] = {}
        self.run_state = "SUCCEEDED"
        self.refuse: dict[str, int] = {}  # "POST /apis/v2beta1/runs" -> HTTP status to answer instead
        self._ids = itertools.count(1)
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _serve(self, method: str):
                url = urllib.parse.urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                request = {"method": method, "path": url.path, "query": urllib.parse.parse_qs(url.query),
                           "authorization": self.headers.get("Authorization"), "body": _body(self.headers, raw)}
                stub.requests.append(request)
                status, answer = stub.answer(request)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._serve("GET")

            def do_POST(self):
                self._serve("POST")

            def do_DELETE(self):
                self._serve("DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _id(self, kind: str) -> str:
        return f"{kind}-{next(self._ids)}"

    def _stamp(self) -> str:
        return f"2025-01-01T00:00:{next(self._ids) % 60:02d}Z"

    def answer(self, req: dict) -> tuple[int, dict]:
        key = f"{req['method']} {req['path']}"
        if key in self.refuse:
            return self.refuse[key], {"error": "refused by the test", "message": "refused by the test", "code": 7}
        q = {k: v[0] for k, v in req["query"].items()}
        path, method = req["path"], req["method"]
        if key == f"GET {API}/healthz":
            return 200, {"multi_user": False, "pipeline_store": "database"}
        if key == f"GET {API}/pipelines":
            name = _filter_name(q.get("filter"))
            found = [p for p in self.pipelines.values() if name is None or p["display_name"] == name]
            return 200, {"pipelines": found, "total_size": len(found)} if found else {}
        if key == f"POST {API}/pipelines/upload":
            pid = self._id("pipeline")
            self.pipelines[pid] = {"pipeline_id": pid, "display_name": q["name"], "name": q["name"],
                                   "created_at": self._stamp()}
            self._version(pid, q["name"], req["body"]["uploadfile"])
            return 200, self.pipelines[pid]
        if key == f"POST {API}/pipelines/upload_version":
            if q.get("pipelineid") not in self.pipelines:
                return 404, {"error": "no such pipeline", "message": "no such pipeline", "code": 5}
            return 200, self._version(q["pipelineid"], q["name"], req["body"]["uploadfile"])
        if method == "GET" and path.startswith(f"{API}/pipelines/") and path.endswith("/versions"):
            pid = path.split("/")[-2]
            found = sorted((v for v in self.versions.values() if v["pipeline_id"] == pid),
                           key=lambda v: v["created_at"], reverse=q.get("sort_by", "").endswith("desc"))
            return 200, {"pipeline_versions": found[:int(q.get("page_size", 10))], "total_size": len(found)}
        if key == f"GET {API}/experiments":
            name = _filter_name(q.get("filter"))
            found = [e for e in self.experiments.values() if name is None or e["display_name"] == name]
            return 200, {"experiments": found} if found else {}
        if key == f"POST {API}/experiments":
            eid = self._id("experiment")
            self.experiments[eid] = {**req["body"], "experiment_id": eid}
            return 200, self.experiments[eid]
        if key == f"POST {API}/runs":
            if not self._known_version(req["body"]):
                return 404, {"error": "unknown pipeline version", "message": "unknown pipeline version", "code": 5}
            rid = self._id("run")
            self.runs[rid] = {**req["body"], "run_id": rid, "state": "PENDING", "created_at": self._stamp()}
            return 200, self.runs[rid]
        if method == "GET" and path.startswith(f"{API}/runs/"):
            rid = path.rsplit("/", 1)[-1]
            if rid not in self.runs:
                return 404, {"error": "no such run", "code": 5}
            self.runs[rid]["state"] = self.run_state
            return 200, self.runs[rid]
        if key == f"POST {API}/recurringruns":
            if not self._known_version(req["body"]):
                return 404, {"error": "unknown pipeline version", "message": "unknown pipeline version", "code": 5}
            jid = self._id("recurring")
            self.recurring[jid] = {**req["body"], "recurring_run_id": jid, "created_at": self._stamp(),
                                   "status": "ENABLED" if req["body"].get("mode") == "ENABLE" else "DISABLED"}
            return 200, self.recurring[jid]
        if key == f"GET {API}/recurringruns":
            return 200, {"recurringRuns": list(self.recurring.values()), "total_size": len(self.recurring)}
        if path.startswith(f"{API}/recurringruns/"):
            jid, _, verb = path.rsplit("/", 1)[-1].partition(":")
            if jid not in self.recurring:
                return 404, {"error": f"recurring run {jid} not found", "message": f"recurring run {jid} not found",
                             "code": 5}
            if method == "DELETE":
                del self.recurring[jid]
                return 200, {}
            if method == "POST" and verb == "disable":
                self.recurring[jid]["status"] = "DISABLED"
                return 200, {}
        return 404, {"error": f"the stand-in has no {key}", "code": 12}

    def _version(self, pid: str, name: str, package: bytes) -> dict:
        vid = self._id("version")
        self.versions[vid] = {"pipeline_id": pid, "pipeline_version_id": vid, "display_name": name, "name": name,
                              "created_at": self._stamp(), "package": package.decode()}
        return {k: v for k, v in self.versions[vid].items() if k != "package"}

    def _known_version(self, body: dict) -> bool:
        ref = body.get("pipeline_version_reference") or {}
        version = self.versions.get(ref.get("pipeline_version_id"))
        return version is not None and version["pipeline_id"] == ref.get("pipeline_id")

    def calls(self, method: str, path: str) -> list[dict]:
        return [r for r in self.requests if r["method"] == method and r["path"] == path]


def _body(headers, raw: bytes):
    """JSON bodies as dicts; multipart uploads as {field: bytes}."""
    ctype = headers.get("Content-Type", "")
    if ctype.startswith("multipart/form-data"):
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {ctype}\r\n\r\n".encode() + raw)
        return {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
                for part in msg.iter_parts()}
    return json.loads(raw) if raw else None


def _filter_name(flt: str | None) -> str | None:
    if not flt:
        return None
    (pred,) = json.loads(flt)["predicates"]
    assert pred["key"] == "display_name" and pred["operation"] in ("EQUALS", 1)
    return pred["stringValue"]


@pytest.fixture
def kfp():
    stub = KfpStub()
    yield stub
    stub.server.shutdown()
    stub.server.server_close()


@pytest.fixture(autouse=True)
def _no_kfp_context(tmp_path, monkeypatch):
    """kfp.Client reads ~/.config/kfp/context.json: keep the user's out of the tests."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def tiny_package(tmp_path_factory):
    """The tiny preset compiled the way submit compiles it (cluster settings in): what must be uploaded."""
    out = tmp_path_factory.mktemp("compiled") / "pipeline.yaml"
    compile_pipeline(str(out), REPO_PARAMS, "tiny")
    return list(yaml.safe_load_all(out.read_text()))


def test_submit_uploads_the_compiled_pipeline_and_runs_that_version(kfp, tiny_package, capsys):
    assert main(["submit", "--host", kfp.url, "--preset", "tiny", "--run-name", "nightly",
                 "--experiment", "retrain"]) == 0
    (upload,) = kfp.calls("POST", f"{API}/pipelines/upload")
    assert upload["query"]["name"] == ["distillery"]
    docs = list(yaml.safe_load_all(upload["body"]["uploadfile"]))
    assert docs == tiny_package  # the compiled IR, platform settings included
    tasks = docs[0]["root"]["dag"]["tasks"]
    assert {"train-base", "serve-check", "promote"} <= set(tasks)
    tiny, _ = load_params(REPO_PARAMS, "tiny")
    assert docs[0]["root"]["inputDefinitions"]["parameters"]["preset"]["defaultValue"] == "tiny"
    config = tasks["train-base"]["inputs"]["parameters"]["config"]["runtimeValue"]["constant"]
    assert config["tiny"]["train"]["steps"] == tiny.train.steps
    (version,) = kfp.versions.values()
    (experiment,) = kfp.calls("POST", f"{API}/experiments")
    assert experiment["body"]["display_name"] == "retrain"
    (run,) = kfp.calls("POST", f"{API}/runs")
    ref = run["body"]["pipeline_version_reference"]
    assert ref == {"pipeline_id": version["pipeline_id"], "pipeline_version_id": version["pipeline_version_id"]}
    assert run["body"]["display_name"] == "nightly"
    assert run["body"]["experiment_id"] == next(iter(kfp.experiments))
    assert "pipeline_spec" not in run["body"]  # the run points at the uploaded version, not a second copy
    (run_id,) = kfp.runs
    out = capsys.readouterr().out
    assert f"{kfp.url}/#/runs/details/{run_id}" in out
    assert "submit: the pipeline asks the cluster for 8 nvidia.com/gpu on train-base" in out  # before uploading


def test_a_second_submit_uploads_a_new_version_and_reuses_the_experiment(kfp, capsys):
    assert main(["submit", "--host", kfp.url, "--preset", "tiny"]) == 0
    assert main(["submit", "--host", kfp.url, "--preset", "tiny", "--source", "/data/raw.jsonl", "--cpu"]) == 0
    assert len(kfp.calls("POST", f"{API}/pipelines/upload")) == 1
    (again,) = kfp.calls("POST", f"{API}/pipelines/upload_version")
    assert b"accelerator" not in again["body"]["uploadfile"]  # --cpu compiles as `distillery compile --cpu`
    assert "submit: the pipeline asks the cluster for no GPUs" in capsys.readouterr().out
    (pid,) = kfp.pipelines
    assert again["query"]["pipelineid"] == [pid]
    assert again["query"]["name"][0].startswith("distillery-")  # <name>-<UTC time>-<package hash>
    newest = [v for v in kfp.versions.values() if v["display_name"] == again["query"]["name"][0]][0]
    second = kfp.calls("POST", f"{API}/runs")[1]["body"]
    assert second["pipeline_version_reference"]["pipeline_version_id"] == newest["pipeline_version_id"]
    assert second["runtime_config"]["parameters"] == {"source_uri": "/data/raw.jsonl"}
    assert len(kfp.calls("POST", f"{API}/experiments")) == 1  # found by name the second time


def test_submit_wait_reports_the_final_state(kfp, capsys):
    assert main(["submit", "--host", kfp.url, "--preset", "tiny", "--wait"]) == 0
    assert "SUCCEEDED" in capsys.readouterr().out
    kfp.run_state = "FAILED"
    assert main(["submit", "--host", kfp.url, "--preset", "tiny", "--wait"]) == 1
    err = capsys.readouterr().err
    assert "ended FAILED" in err and f"{kfp.url}/#/runs/details/" in err


def test_schedule_sends_six_field_cron_and_the_uploaded_version(kfp, capsys):
    assert main(["schedule", "--host", kfp.url, "--preset", "tiny", "--cron", "0 3 * * 1", "--max-concurrency", "2",
                 "--start", "2025-02-01T00:00:00", "--end", "2025-12-31T23:00:00+01:00"]) == 0
    out = capsys.readouterr().out
    assert "'0 0 3 * * 1'" in out and "seconds first" in out  # said, not silently changed
    (job,) = kfp.calls("POST", f"{API}/recurringruns")
    body = job["body"]
    assert body["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 1"
    assert body["trigger"]["cron_schedule"]["start_time"] == "2025-02-01T00:00:00Z"
    assert body["trigger"]["cron_schedule"]["end_time"] == "2025-12-31T22:00:00Z"
    assert int(body["max_concurrency"]) == 2 and body["no_catchup"] is True and body["mode"] == "ENABLE"
    (version,) = kfp.versions.values()
    assert body["pipeline_version_reference"]["pipeline_version_id"] == version["pipeline_version_id"]
    (jid,) = kfp.recurring
    assert f"{kfp.url}/#/recurringrun/details/{jid}" in out


def test_schedule_catchup_six_fields_list_disable_delete(kfp, capsys):
    assert main(["schedule", "--host", kfp.url, "--preset", "tiny", "--cron", "30 0 */6 * * ?", "--catchup",
                 "--name", "six-hourly"]) == 0
    body = kfp.calls("POST", f"{API}/recurringruns")[0]["body"]
    assert body["trigger"]["cron_schedule"]["cron"] == "30 0 */6 * * ?" and body["no_catchup"] is False
    (jid,) = kfp.recurring
    capsys.readouterr()
    assert main(["schedule", "--host", kfp.url, "--list"]) == 0
    listed = capsys.readouterr().out
    assert jid in listed and "six-hourly" in listed and "30 0 */6 * * ?" in listed
    assert main(["schedule", "--host", kfp.url, "--disable", jid]) == 0
    assert kfp.recurring[jid]["status"] == "DISABLED"
    assert main(["schedule", "--host", kfp.url, "--delete", jid]) == 0
    assert not kfp.recurring
    assert main(["schedule", "--host", kfp.url, "--delete", jid]) == 1  # the server's 404, as one line
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"at {kfp.url} refused the request: HTTP 404" in err and "not found" in err


@pytest.mark.parametrize("cron, fragment", [("61 * * * *", "minute field '61'"), ("* * * *", "got 4"),
                                            ("0 3 * * 7", "0 = Sunday"), ("0 3 * * MON-", "''"),
                                            ("*/0 * * * *", "step '0'"), ("0 5-1 * * *", "backwards"),
                                            ("@fortnightly", "unknown descriptor")])
def test_a_bad_cron_is_a_parameter_error_and_nothing_is_sent(kfp, capsys, cron, fragment):
    assert main(["schedule", "--host", kfp.url, "--preset", "tiny", "--cron", cron]) == 2
    err = capsys.readouterr().err
    assert "--cron" in err and fragment in err, err
    assert kfp.requests == []


def test_bad_times_concurrency_and_token_env_are_refused_before_any_request(kfp, capsys, monkeypatch):
    monkeypatch.delenv("KFP_TEST_TOKEN", raising=False)
    for extra, fragment in ((["--start", "tomorrow"], "--start 'tomorrow'"),
                            (["--start", "2025-03-01", "--end", "2025-02-01"], "--end"),
                            (["--max-concurrency", "11"], "--max-concurrency 11"),
                            (["--token-env", "KFP_TEST_TOKEN"], "--token-env KFP_TEST_TOKEN")):
        assert main(["schedule", "--host", kfp.url, "--preset", "tiny", "--cron", "@daily", *extra]) == 2
        assert fragment in capsys.readouterr().err
    assert main(["submit", "--host", "kfp.example.com", "--preset", "tiny"]) == 2
    assert "--host 'kfp.example.com'" in capsys.readouterr().err
    assert kfp.requests == []


def test_the_token_goes_out_as_a_bearer_header(kfp, monkeypatch):
    monkeypatch.setenv("KFP_TEST_TOKEN", "s3cret")
    assert main(["schedule", "--host", kfp.url, "--token-env", "KFP_TEST_TOKEN", "--list"]) == 0
    assert kfp.requests and all(r["authorization"] == "Bearer s3cret" for r in kfp.requests)


def test_an_unreachable_host_is_one_line_naming_it(capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    host = f"http://127.0.0.1:{port}"
    assert main(["submit", "--host", host, "--preset", "tiny"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"distillery: cannot reach Kubeflow Pipelines at {host}: [Errno 111] Connection refused"


def test_a_refused_request_names_the_host_and_status(kfp, capsys):
    kfp.refuse[f"POST {API}/runs"] = 403
    assert main(["submit", "--host", kfp.url, "--preset", "tiny"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"distillery: Kubeflow Pipelines at {kfp.url} refused the request: HTTP 403 Forbidden: refused by the test"


# --- the cron normaliser, property-based ---

def _field(spec) -> st.SearchStrategy[str]:
    """Valid text for one cron field: *, ?, N, N-M, with optional /STEP, comma lists, names."""
    _, low, high, names = spec
    number = st.integers(low, high)
    value = number.map(str) | (st.sampled_from(sorted(names)) if names else number.map(str))
    span = st.one_of(st.just("*"), st.just("?"), value,
                     st.tuples(number, number).map(lambda ab: f"{min(ab)}-{max(ab)}"))
    item = st.tuples(span, st.none() | st.integers(1, 90)).map(lambda t: t[0] + (f"/{t[1]}" if t[1] else ""))
    return st.lists(item, min_size=1, max_size=3).map(",".join)


SIX = st.tuples(*(_field(spec) for spec in CRON_FIELDS))


@settings(max_examples=200, deadline=None)
@given(SIX)
def test_valid_six_field_cron_passes_unchanged(fields):
    text = " ".join(fields)
    assert normalize_cron(text) == (text, "")


@settings(max_examples=200, deadline=None)
@given(SIX)
def test_five_field_cron_gets_zero_seconds_and_normalising_is_idempotent(fields):
    five = " ".join(fields[1:])
    six, note = normalize_cron(f"  {five.replace(' ', '   ')} ")  # spacing does not matter
    assert six == f"0 {five}" and "seconds first" in note
    assert normalize_cron(six) == (six, "")


@settings(max_examples=200, deadline=None)
@given(SIX, st.integers(0, 5), st.integers(1, 500))
def test_a_number_outside_its_field_is_refused_naming_the_field(fields, index, past):
    name, low, high, _ = CRON_FIELDS[index]
    bad = list(fields)
    bad[index] = str(high + past)
    with pytest.raises(ConfigError) as err:
        normalize_cron(" ".join(bad))
    assert str(err.value).startswith("--cron ") and f"{name} field" in str(err.value)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789*?/,- @abcdefghijklmnopqrstuvwxyzMONJA", max_size=30))
def test_any_text_is_either_refused_clearly_or_becomes_six_fields(text):
    try:
        cron, _ = normalize_cron(text)
    except ConfigError as err:
        assert str(err).startswith("--cron ")
    else:
        assert cron.startswith("@") or len(cron.split(" ")) == 6
