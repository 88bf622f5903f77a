"""serve.check: infrastructure validation of a newly exported version in a real Triton server.

    from components.serve.check import run_check
    with TritonServer("runs/triton") as server:
        report = run_check(server, "runs/triton")            # newest version; raises CheckError on a fault

    distillery check --repository REPOSITORY --out DIR [--version N] [--checkpoint F] [--no-loadtest]

What it proves, per model (`<name>_generate`, `<name>_score`):
  1. the version loads: both models are (re)loaded through the model-control API; with
     `latest {num_versions: 1}` Triton moves to the newest version, and when that one fails to load
     it keeps the previous version serving. If only one of the pair fails, the other is pinned back
     to its previous version (a load with a `specific` version-policy override), so generate and
     score never serve different weights. CheckError names the version, the reason and what still
     serves; the broken version must then be removed before any restart (a fresh server would
     try the newest version and serve nothing);
  2. the served version is the one asked for (the index shows exactly it READY), and its copied
     model files still hash to the sha256 that export.json recorded;
  3. a fixed probe set answers through tritonclient over HTTP and gRPC, each pinned to the version,
     and equals the in-process outputs of the same model folder: greedy generate text exactly,
     score log-probs within `CheckConfig.atol`. The reference is the version's own copied
     model_folder unless `model_folder` is given (then: "does the server serve this folder?").

This is an infrastructure check (the bytes served are the model's), not a quality gate: that is
the evaluate step's and registry.promote's job.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
from tritonclient.utils import InferenceServerException

from components.serve import client as calls
from components.serve.errors import ServeError
from components.serve.config import CheckConfig, ServeConfig
from components.serve.export import KINDS, MODEL_DIR, model_name, versions
from components.serve.server import ServerError, TritonServer


class CheckError(ServeError):
    """A served version that did not load or answered differently from the model in-process."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def reference_outputs(model_folder: str | os.PathLike, cfg: CheckConfig) -> dict:
    """The in-process answers to the probe set: greedy continuations and per-token log-probs."""
    import torch
    import torch.nn.functional as F

    from components.model.folder import load_model

    from components.serve.triton_model import text_ids

    model, tok = load_model(model_folder)
    texts = []
    for prompt in cfg.prompts:
        ids = torch.tensor([text_ids(tok, prompt)], dtype=torch.long)
        out = model.generate(ids, cfg.max_tokens, temperature=0.0, eos_id=tok.eos_ids)[0, ids.size(1):].tolist()
        texts.append(tok.decode(tok.until_eos(out)))
    score_ids, logps = [], []
    for text in cfg.score_texts:
        ids = tok.encode(text)[: model.cfg.block_size]
        if len(ids) < 2:
            raise ValueError(f"score probe {text!r} has {len(ids)} token(s); the score model needs at least 2")
        x = torch.tensor([ids], dtype=torch.long)
        with torch.inference_mode():
            logits, _ = model(x)
            lp = F.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, x[:, 1:, None])[0, :, 0]
        score_ids.append(ids)
        logps.append(lp.numpy())
    return {"generate": texts, "score_ids": score_ids, "score": logps}


def _serving(server: TritonServer, model: str) -> list[int]:
    return sorted(v for v, (state, _) in server.version_states(model).items() if state == "READY")


def _pin(server: TritonServer, model: str, versions_: list[int]) -> None:
    """Reload `model` serving exactly `versions_` (config override with a specific version policy);
    it holds until the repository changes and a plain load reads config.pbtxt again."""
    client = server.client("http")
    try:
        config = client.get_model_config(model)
    finally:
        client.close()
    server.load(model, config={**config, "version_policy": {"specific": {"versions": versions_}}})


def _load_all(server: TritonServer, models: list[str], version: int, report: dict) -> None:
    """Load every model of the pair and make sure `version` is what serves. When one fails, the
    others are pinned back to what served before (a pair never stays split across versions) and
    CheckError says which version failed, why, and what still serves."""
    before = {m: _serving(server, m) for m in models}
    failure = None
    for model in models:
        error = ""
        if before[model] != [version]:  # already serving exactly this version: nothing to load
            try:
                server.load(model)
            except ServerError as err:
                error = str(err)
        states = server.version_states(model)
        state, reason = states.get(version, ("MISSING", "not in the repository index"))
        serving = sorted(v for v, (s, _) in states.items() if s == "READY")
        report["models"][model] = {"version": version, "state": state, "serving": serving}
        if state != "READY" or error:
            failure = (f"{model} version {version} failed to load ({state}: {(reason or error).strip()[:500]})")
            break
        if serving != [version]:
            failure = (f"{model}: version {version} is READY but {serving} serve; is the version policy "
                       f"`latest {{num_versions: 1}}` and {version} the newest?")
            break
    if failure is None:
        return
    report["passed"] = False
    for model in models:
        now = _serving(server, model)
        if before[model] and now != before[model]:
            _pin(server, model, before[model])
            report["models"].setdefault(model, {})["rolled_back_to"] = before[model]
        report["models"].setdefault(model, {})["serving"] = _serving(server, model)
    still = {m: report["models"][m]["serving"] for m in models}
    summary = ", ".join(f"{m} {v}" for m, v in still.items())
    raise CheckError(f"{failure}; still serving: {summary}", report)


def _check_files(repo: Path, name: str, version: int, report: dict) -> None:
    """Each version folder's model files still hash to what export.json recorded at export."""
    from components.artifacts import sha256_path

    for kind in KINDS:
        vdir = repo / model_name(name, kind) / str(version)
        record = vdir / "export.json"
        if not record.is_file():
            continue  # exported by something else: nothing to compare with
        want = json.loads(record.read_text(encoding="utf-8")).get("sha256")
        ok = want == sha256_path(vdir / MODEL_DIR)
        report["models"][model_name(name, kind)]["files_match_export"] = ok
        if not ok:
            report["passed"] = False
            raise CheckError(f"{model_name(name, kind)} version {version}: {vdir / MODEL_DIR} no longer matches "
                             f"the sha256 recorded in export.json at export", report)


def run_check(server: TritonServer, repository: str | os.PathLike, name: str = "distillery",
              version: int | None = None, model_folder: str | os.PathLike | None = None,
              cfg: CheckConfig | None = None) -> dict:
    """Load `version` (default: the newest) of both models, probe them over HTTP and gRPC, compare
    with the in-process model; returns the report, or raises CheckError naming the first faulty probe."""
    cfg = cfg or CheckConfig()
    repo = Path(repository)
    gen, sco = model_name(name, "generate"), model_name(name, "score")
    if version is None:
        have = versions(repo / gen)
        if not have:
            raise CheckError(f"{repo / gen}: no versions to check", {"passed": False})
        version = have[-1]
    reference_folder = Path(model_folder) if model_folder else repo / gen / str(version) / MODEL_DIR
    start = time.perf_counter()
    report: dict = {"version": version, "reference": str(reference_folder), "protocols": list(cfg.protocols),
                    "models": {}, "probes": [], "max_abs_logprob_diff": 0.0, "passed": True}
    _load_all(server, [model_name(name, kind) for kind in KINDS], version, report)
    _check_files(repo, name, version, report)
    ref = reference_outputs(reference_folder, cfg)
    faults = []
    for protocol in cfg.protocols:
        client = server.client(protocol)
        try:
            for i, (prompt, want) in enumerate(zip(cfg.prompts, ref["generate"], strict=True)):
                probe = f"generate[{i}] over {protocol}"
                try:
                    got = calls.generate(client, gen, [prompt], max_tokens=cfg.max_tokens, temperature=0.0,
                                         version=version)[0]
                except InferenceServerException as err:
                    got = f"<error {err}>"
                ok = got == want
                report["probes"].append({"probe": probe, "prompt": prompt, "expected": want, "got": got, "ok": ok})
                if not ok:
                    faults.append(f"{probe} (prompt {prompt!r}): served {got!r}, in-process {want!r}")
            for i, (ids, want) in enumerate(zip(ref["score_ids"], ref["score"], strict=True)):
                probe = f"score[{i}] over {protocol}"
                try:
                    got = calls.score(client, sco, [ids], version=version)[0]
                    diff = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
                    detail = f"log-probs differ by {diff:.3g} > atol {cfg.atol} (shapes {got.shape} vs {want.shape})"
                except InferenceServerException as err:
                    diff, detail = float("inf"), f"error {err}"
                finite = math.isfinite(diff)  # the report stays strict JSON: no Infinity
                if finite:
                    report["max_abs_logprob_diff"] = max(report["max_abs_logprob_diff"], diff)
                ok = diff <= cfg.atol
                report["probes"].append({"probe": probe, "text": cfg.score_texts[i],
                                         "max_abs_diff": diff if finite else None, "ok": ok})
                if not ok:
                    faults.append(f"{probe} (text {cfg.score_texts[i]!r}): {detail}")
        finally:
            client.close()
    report["seconds"] = round(time.perf_counter() - start, 3)
    if faults:
        report["passed"] = False
        more = f" (and {len(faults) - 1} more)" if len(faults) > 1 else ""
        raise CheckError(f"serve.check of version {version} failed: {faults[0]}{more}", report)
    return report


def run(cfg: ServeConfig, repository: str | os.PathLike, version: int | None = None,
        model_folder: str | os.PathLike | None = None, report_path: str | os.PathLike | None = None,
        log_path: str | os.PathLike | None = None) -> dict:
    """The serve.check step (CLI, KFP and DVC share it): a fresh local server on `repository`,
    `run_check`, the report written to `report_path` (also on failure), the server stopped.
    Raises CheckError when the check fails."""
    with TritonServer(repository, cfg.server, log_path=log_path) as server:
        try:
            report = run_check(server, repository, cfg.export.name, version, model_folder, cfg.check)
        except CheckError as err:
            if report_path:
                Path(report_path).write_text(json.dumps(err.report, indent=2) + "\n", encoding="utf-8")
            raise
    if report_path:
        Path(report_path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def run_step(cfg: ServeConfig, repository: str | os.PathLike, out_dir: str | os.PathLike,
             version: int | None = None, model_folder: str | os.PathLike | None = None,
             loadtest: bool = True) -> dict:
    """serve.check as the pipeline runs it (CLI `distillery check`, the KFP component, DVC): one
    local server on `repository`; check.json (also when the check fails, then CheckError), then
    the load test's loadtest.json / loadtest.md / loadtest.png in `out_dir`, the server log
    beside them. Returns {"check": report, "loadtest": {"rows", "table"} or None}."""
    from components.serve.loadtest import run_loadtest

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("check.json", "loadtest.json", "loadtest.md", "loadtest.png"):  # never an old run's evidence
        (out / stale).unlink(missing_ok=True)
    with TritonServer(repository, cfg.server, log_path=out / "tritonserver.log") as server:
        try:
            report = run_check(server, repository, cfg.export.name, version, model_folder, cfg.check)
        except CheckError as err:
            (out / "check.json").write_text(json.dumps(err.report, indent=2) + "\n", encoding="utf-8")
            raise
        (out / "check.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        load = None
        if loadtest:
            load = run_loadtest(server, repository, cfg.loadtest, cfg.export.name, png=out / "loadtest.png")
            (out / "loadtest.json").write_text(json.dumps(load["rows"], indent=2) + "\n", encoding="utf-8")
            (out / "loadtest.md").write_text(load["table"] + "\n", encoding="utf-8")
    return {"check": report, "loadtest": load}
