"""serve.check against the real server: a good version passes over HTTP and gRPC, a different model
is caught by name, and a corrupt new version fails to load while the previous one keeps serving."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from components.serve import client as calls
from components.serve.check import CheckError, run_check
from components.serve.config import CheckConfig
from components.serve.export import export_repository

CHECK = CheckConfig(prompts=["1 + 2 =", "What is 3 * 4?"], max_tokens=8, score_texts=["1 + 2 = 3 #### 3"])


def test_check_passes_over_http_and_grpc(server, repository, model_folder):
    report = run_check(server, repository, version=1, model_folder=model_folder, cfg=CHECK)
    assert report["passed"] and report["version"] == 1
    assert {p["probe"] for p in report["probes"]} == {
        f"{kind}[{i}] over {proto}" for proto in ("http", "grpc")
        for kind, n in (("generate", 2), ("score", 1)) for i in range(n)}
    assert all(p["ok"] for p in report["probes"]) and report["max_abs_logprob_diff"] <= CHECK.atol
    assert report["models"]["distillery_generate"] == {"version": 1, "state": "READY", "serving": [1],
                                                       "files_match_export": True}


def test_check_names_the_probe_that_differs(server, repository, other_model_folder):
    with pytest.raises(CheckError, match=r"generate\[0\] over http \(prompt '1 \+ 2 ='\)") as err:
        run_check(server, repository, version=1, model_folder=other_model_folder, cfg=CHECK)
    report = err.value.report
    assert not report["passed"] and json.dumps(report, allow_nan=False)  # check.json for the registry
    assert any(p["probe"].startswith("score") and not p["ok"] for p in report["probes"])


def test_a_corrupt_new_version_fails_to_load_and_the_old_one_keeps_serving(server, repository, model_folder,
                                                                           export_cfg):
    name = "corrupt"  # a model pair of its own: the shared `distillery` models stay untouched
    export_repository(model_folder, repository, name=name, cfg=export_cfg)
    assert run_check(server, repository, name=name, cfg=CHECK)["passed"]
    export_repository(model_folder, repository, name=name, cfg=export_cfg)  # version 2 ...
    weights = repository / f"{name}_score" / "2" / "model_folder" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)  # ... with its weights cut short
    with pytest.raises(CheckError, match=r"corrupt_generate|corrupt_score") as err:
        run_check(server, repository, name=name, cfg=CHECK)
    message = str(err.value)
    assert "corrupt_score version 2 failed to load" in message
    assert "model.safetensors" in message  # the reason from the backend travels with it
    assert "still serving: corrupt_generate [1], corrupt_score [1]" in message
    # generate's version 2 loaded fine, and was pinned back to 1 so the pair stays on one version
    assert err.value.report["models"]["corrupt_generate"]["rolled_back_to"] == [1]
    client = server.client("grpc")
    try:
        for kind in ("generate", "score"):
            assert client.get_model_metadata(f"{name}_{kind}", as_json=True)["versions"] == ["1"]
        out = calls.score(client, f"{name}_score", [[5, 6, 7, 8]])
        assert out.shape == (1, 3) and np.isfinite(out).all()
    finally:
        client.close()
    assert server.version_states(f"{name}_score")[2][0] == "UNAVAILABLE"
    _unload(server, name)


def test_files_changed_after_export_are_caught(server, repository, model_folder, export_cfg):
    export_repository(model_folder, repository, name="tampered", cfg=export_cfg)
    with open(repository / "tampered_generate/1/model_folder/manifest.json", "a") as f:
        f.write(" ")  # loads and answers fine, but is not what was exported
    try:
        with pytest.raises(CheckError, match="no longer matches the sha256"):
            run_check(server, repository, name="tampered", cfg=CHECK)
    finally:
        _unload(server, "tampered")


def _unload(server, name):
    for kind in ("generate", "score"):
        server.unload(f"{name}_{kind}")
