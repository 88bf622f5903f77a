"""The real tritonserver process: start, readiness, restricted model control, clean stop, a clear
error on a failed start."""

from __future__ import annotations

import os
import site
import sys
import sysconfig
import time
from pathlib import Path

import pytest
from tritonclient.utils import InferenceServerException

from components.serve.config import ServerConfig
from components.serve.server import ADMIN_HEADER, REPO_ROOT, ServerError, TritonServer, stub_environment


def test_start_ready_and_stop(repository, tmp_path):
    log = tmp_path / "server.log"
    with TritonServer(repository, log_path=log) as server:
        assert server.is_alive()
        assert len({server.http_port, server.grpc_port, server.metrics_port}) == 3
        for protocol in ("http", "grpc"):
            client = server.client(protocol)
            assert client.is_server_live() and client.is_server_ready()
            assert not client.is_model_ready("distillery_score")  # explicit mode: nothing loaded at start
            client.close()
        pid = server._proc.pid
    assert not server.is_alive()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    text = log.read_text()
    assert "MODE_EXPLICIT" in text and "Started GRPCInferenceService" in text


def test_model_control_is_restricted_to_our_header(server):
    for protocol in ("http", "grpc"):
        client = server.client(protocol)
        try:
            with pytest.raises(InferenceServerException, match="restricted"):
                client.load_model("distillery_score")
            with pytest.raises(InferenceServerException, match="restricted"):
                client.unload_model("distillery_score")
            assert client.is_model_ready("distillery_score")  # inference-side APIs stay open
        finally:
            client.close()
    http = server.client("http")
    with pytest.raises(InferenceServerException) as err:
        http.load_model("distillery_score")
    assert err.value.status() == "403"
    with pytest.raises(InferenceServerException, match="restricted"):
        http.get_model_repository_index()
    index = http.get_model_repository_index(headers={ADMIN_HEADER: server.token})  # the helper's header works
    assert {"distillery_generate", "distillery_score"} <= {m["name"] for m in index}
    http.close()


def test_the_stubs_run_this_interpreter_and_find_this_checkout(server):
    env = stub_environment({})
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(REPO_ROOT) and (REPO_ROOT / "components").is_dir()
    assert set(site.getsitepackages()) <= set(env["PYTHONPATH"].split(os.pathsep))
    assert env["LD_LIBRARY_PATH"].split(os.pathsep)[0] == sysconfig.get_config_var("LIBDIR")
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    # each stub logs the Python it embeds: the same version as this process (not the OS one)
    assert f"Python {sys.version.split()[0]} at {sys.prefix}," in server.log_path.read_text()


def test_a_server_that_cannot_start_fails_fast_with_its_log(repository, tmp_path):
    cfg = ServerConfig(binary="/bin/false", startup_timeout_s=20)
    start = time.monotonic()
    with pytest.raises(ServerError, match="exited with code 1 while starting"):
        TritonServer(repository, cfg, log_path=tmp_path / "log").start()
    assert time.monotonic() - start < 10
    with pytest.raises(ServerError, match="not a folder"):
        TritonServer(tmp_path / "missing").start()
