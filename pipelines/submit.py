"""Kubeflow Pipelines: upload the compiled pipeline, run it once, or on a schedule (retraining).

    distillery submit --host http://localhost:8080 --preset small            # upload + run, print its URL
    distillery submit --host https://kf.example.com --token-env KFP_TOKEN --namespace ml-team --wait
    distillery schedule --host http://localhost:8080 --cron "0 3 * * 1"      # Mondays 03:00 UTC
    distillery schedule --host http://localhost:8080 --list                  # recurring runs, one per line
    distillery schedule --host http://localhost:8080 --disable ID            # or --delete ID

Both compile the pipeline the way `distillery compile` does (every preset, --preset the run
form's default, --set, the `cluster` section as Kubernetes settings, --cpu), say what it asks of
the cluster in one line, then upload it through `kfp.Client`: a new pipeline the first
time, a new version of it afterwards (named by the UTC time and the package's hash), so every
run records exactly which compiled DAG it ran. Runs go into an experiment (made when missing).

Cron: KFP's scheduler reads six fields with seconds first (robfig/cron v1), and reads a
five-field expression as *seconds* minutes hours ... (so "0 3 * * *" would run at minute 3 of
every hour). `normalize_cron` accepts standard five-field cron and prepends "0 " for the
seconds, says so, and checks every field before anything is sent. Descriptors (@daily, @hourly,
@every 6h, ...) pass through. Times are UTC.

Errors: a bad --cron / --start / --host is a parameter error (exit 2) and nothing is sent; an
unreachable server or a refused request is one line naming the host (exit 1).
These are plain functions taking a `kfp.Client`, so a test can point a real client at a local
stand-in server (tests/pipelines/test_submit.py).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from components.config import ConfigError
from components.errors import InputError

MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
CRON_FIELDS = (("second", 0, 59, {}), ("minute", 0, 59, {}), ("hour", 0, 23, {}), ("day of month", 1, 31, {}),
               ("month", 1, 12, {m: i + 1 for i, m in enumerate(MONTHS)}),
               ("day of week", 0, 6, {d: i for i, d in enumerate(DAYS)}))
"""The six fields of KFP's cron (robfig/cron v1): name, lowest, highest, names accepted."""
DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
EVERY = re.compile(r"@every ((\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+)")
MAX_CONCURRENCY = 10
"""KFP's API server accepts max_concurrency 1..10."""
FINISHED = ("SUCCEEDED", "FAILED", "SKIPPED", "CANCELED", "ERROR")
CPU_HELP = ("compile for a cluster without GPUs: no accelerators (cluster.gpus_per_node 0), no GPU node selector "
            "or tolerations, the CPU image on every task")
"""The --cpu flag of compile, submit and schedule (pipelines/pipeline.py CPU_ONLY)."""


class SubmitError(InputError, RuntimeError):
    """The Kubeflow Pipelines API server could not be reached, refused a request, or a run failed."""


def normalize_cron(expr: str) -> tuple[str, str]:
    """(the expression KFP gets, a note for the user or ""): five fields get "0 " for seconds,
    six are checked as they are, descriptors pass. ConfigError naming --cron if it is not valid."""
    text = " ".join(str(expr).split())
    bad = f"--cron {expr!r}"
    if text.startswith("@"):
        if text in DESCRIPTORS or EVERY.fullmatch(text):
            return text, ""
        raise ConfigError(f"{bad}: unknown descriptor; known: {', '.join(DESCRIPTORS)}, @every <duration> (e.g. 6h)")
    fields = text.split(" ") if text else []
    note = ""
    if len(fields) == 5:
        fields = ["0", *fields]
        note = (f"cron: {text!r} read as standard cron (minute hour day month weekday); KFP's takes seconds "
                f"first, so it gets {' '.join(fields)!r}")
    elif len(fields) != 6:
        raise ConfigError(f"{bad}: expected 5 fields (minute hour day-of-month month day-of-week) or 6 (seconds "
                          f"first, as KFP reads them), got {len(fields)}")
    for value, spec in zip(fields, CRON_FIELDS):
        _check_field(value, *spec, bad)
    return " ".join(fields), note


def _check_field(value: str, name: str, low: int, high: int, names: dict[str, int], bad: str) -> None:
    """One cron field: comma-separated `*`, `?`, N, N-M, each with an optional /STEP (robfig's grammar)."""
    for part in value.split(","):
        where = f"{bad}: {name} field {value!r}"
        span, slash, step = part.partition("/")
        if slash and not (step.isdigit() and int(step) > 0):
            raise ConfigError(f"{where}: step {step!r} must be a whole number above 0")
        if span in ("*", "?"):
            continue
        first, dash, last = span.partition("-")
        start = _cron_number(first, names, where)
        end = _cron_number(last, names, where) if dash else start
        for number in (start, end):
            if not low <= number <= high:
                hint = " (0 = Sunday; KFP has no 7)" if name == "day of week" else ""
                raise ConfigError(f"{where}: {number} is outside {low}-{high}{hint}")
        if start > end:
            raise ConfigError(f"{where}: range {span!r} runs backwards")


def _cron_number(token: str, names: dict[str, int], where: str) -> int:
    if token.isdigit():
        return int(token)
    if token.upper() in names:
        return names[token.upper()]
    raise ConfigError(f"{where}: {token!r} is not a number" + (f" or one of {', '.join(names)}" if names else ""))


def rfc3339(value: str | None, flag: str) -> str | None:
    """An ISO-8601 time as the UTC RFC 3339 string KFP takes; no zone means UTC."""
    if value is None:
        return None
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(f"{flag} {value!r}: not an ISO-8601 time, e.g. 2025-01-31T03:00:00Z") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_host(host: str) -> str:
    """The API server's URL, checked: kfp.Client would silently put https:// before a bare name."""
    if not re.match(r"https?://[^/\s]+", host or ""):
        raise ConfigError(f"--host {host!r}: give the URL with its scheme, e.g. http://localhost:8080 "
                          f"(a port-forward of ml-pipeline-ui) or https://kubeflow.example.com/pipeline")
    return host.rstrip("/")


@contextlib.contextmanager
def talking_to(host: str) -> Iterator[None]:
    """Turn the client's network and HTTP errors into one SubmitError line naming `host`."""
    import kfp_server_api
    import urllib3

    try:
        yield
    except ConfigError:
        raise
    except kfp_server_api.ApiException as err:
        detail = ""
        try:
            body = json.loads(err.body or "{}")
            detail = body.get("message") or body.get("error") or ""
        except (TypeError, ValueError, AttributeError):
            detail = str(err.body or "")[:200]
        detail = " ".join(str(detail).split())
        raise SubmitError(f"Kubeflow Pipelines at {host} refused the request: HTTP {err.status} {err.reason}"
                          + (f": {detail}" if detail else "")) from None
    except (urllib3.exceptions.HTTPError, OSError) as err:
        reason = str(getattr(err, "reason", None) or err)
        found = re.search(r"\[Errno [^\]]+\][^)\"']*", reason)
        reason = found.group(0).strip() if found else " ".join(reason.split())
        raise SubmitError(f"cannot reach Kubeflow Pipelines at {host}: {reason}") from None
    except ValueError as err:  # kfp.Client's own checks of what the server answered
        raise SubmitError(f"Kubeflow Pipelines at {host}: {err}") from None


def connect(host: str, token: str | None = None, namespace: str | None = None) -> Any:
    """A kfp.Client for `host` (a bearer token if given; a namespace for multi-user Kubeflow).
    Without a namespace the client asks the server's healthz first: an unreachable host fails here."""
    import logging

    import kfp

    host = check_host(host)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # its "Retrying" lines: we say it once
    with talking_to(host), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "this client only works with KFP v2": we are
        return kfp.Client(host=host, existing_token=token, namespace=namespace or "kubeflow")


@dataclass
class Uploaded:
    """The pipeline version a run or recurring run uses."""

    pipeline_id: str
    """The pipeline's id on the server."""
    version_id: str
    """The version's id (the uploaded package)."""
    version_name: str
    """Its name: <pipeline>-<UTC time>-<first 8 hex of the package's sha256>."""
    new_pipeline: bool
    """True when this upload created the pipeline."""


def find_pipeline(client: Any, name: str, namespace: str | None = None) -> str | None:
    """The id of the pipeline named `name`, or None."""
    flt = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})
    found = client.list_pipelines(filter=flt, namespace=namespace, page_size=10).pipelines or []
    found = [p for p in found if p.display_name == name]
    if len(found) > 1:
        raise SubmitError(f"{len(found)} pipelines are named {name!r}; pass --pipeline-name to pick another name")
    return found[0].pipeline_id if found else None


def upload(client: Any, package: str | Path, name: str, namespace: str | None = None,
           description: str = "") -> Uploaded:
    """Upload `package` as pipeline `name`: a new pipeline, or a new version of the existing one."""
    digest = hashlib.sha256(Path(package).read_bytes()).hexdigest()[:8]
    version = f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{digest}"
    pipeline_id = find_pipeline(client, name, namespace)
    if pipeline_id is None:
        pipeline = client.upload_pipeline(str(package), pipeline_name=name, description=description or None,
                                          namespace=namespace)
        # the server makes the first version from the same package; newest first
        versions = client.list_pipeline_versions(pipeline.pipeline_id, page_size=1,
                                                 sort_by="created_at desc").pipeline_versions or []
        if not versions:
            raise SubmitError(f"pipeline {name!r} ({pipeline.pipeline_id}) was uploaded but the server lists no version")
        return Uploaded(pipeline.pipeline_id, versions[0].pipeline_version_id, versions[0].display_name or name, True)
    made = client.upload_pipeline_version(str(package), version, pipeline_id=pipeline_id,
                                          description=description or None)
    return Uploaded(pipeline_id, made.pipeline_version_id, version, False)


def experiment_id(client: Any, name: str, namespace: str | None = None) -> str:
    """The id of experiment `name`, made if missing."""
    return client.create_experiment(name, namespace=namespace).experiment_id


def submit(client: Any, package: str | Path, *, host: str, pipeline_name: str, experiment: str, run_name: str,
           namespace: str | None = None, params: dict[str, Any] | None = None, wait: bool = False,
           timeout_s: float = 86400) -> dict[str, Any]:
    """Upload `package` and start one run of it; with `wait`, block until it ends (SubmitError
    if it does not succeed). Returns ids, the run's URL and (waited) its final state."""
    with talking_to(host):
        up = upload(client, package, pipeline_name, namespace)
        exp = experiment_id(client, experiment, namespace)
        run = client.run_pipeline(exp, run_name, params=params or {}, pipeline_id=up.pipeline_id,
                                  version_id=up.version_id)
        result = {"pipeline_id": up.pipeline_id, "version_id": up.version_id, "version": up.version_name,
                  "experiment_id": exp, "run_id": run.run_id, "url": f"{host}/#/runs/details/{run.run_id}"}
        if wait:
            try:
                done = client.wait_for_run_completion(run.run_id, timeout=timeout_s)
            except TimeoutError:
                raise SubmitError(f"run {run.run_id} still running after {timeout_s:.0f} s: {result['url']}") from None
            result["state"] = str(done.state)
            if str(done.state).upper() != "SUCCEEDED":
                raise SubmitError(f"run {run.run_id} ended {done.state}: {result['url']}")
    return result


def schedule(client: Any, package: str | Path, *, host: str, cron: str, name: str, pipeline_name: str,
             experiment: str, namespace: str | None = None, max_concurrency: int = 1, catchup: bool = False,
             start: str | None = None, end: str | None = None,
             params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Upload `package` and create an enabled recurring run of it on `cron` (already normalized:
    six fields). Returns ids and its URL."""
    if not 1 <= max_concurrency <= MAX_CONCURRENCY:
        raise ConfigError(f"--max-concurrency {max_concurrency}: KFP takes 1 to {MAX_CONCURRENCY}")
    with talking_to(host):
        up = upload(client, package, pipeline_name, namespace)
        exp = experiment_id(client, experiment, namespace)
        job = client.create_recurring_run(exp, name, cron_expression=cron, max_concurrency=max_concurrency,
                                          no_catchup=not catchup, start_time=start, end_time=end,
                                          params=params or {}, pipeline_id=up.pipeline_id, version_id=up.version_id)
    return {"pipeline_id": up.pipeline_id, "version_id": up.version_id, "version": up.version_name,
            "experiment_id": exp, "recurring_run_id": job.recurring_run_id, "cron": cron,
            "url": f"{host}/#/recurringrun/details/{job.recurring_run_id}"}


def list_schedules(client: Any, *, host: str, namespace: str | None = None) -> list[dict[str, Any]]:
    """Every recurring run the server lists (all pages): id, name, status, cron, concurrency."""
    rows, token = [], ""
    with talking_to(host):
        while True:
            page = client.list_recurring_runs(page_token=token, page_size=100, namespace=namespace)
            for job in page.recurring_runs or []:
                trigger = job.trigger
                cron = trigger.cron_schedule.cron if trigger and trigger.cron_schedule else None
                every = trigger.periodic_schedule.interval_second if trigger and trigger.periodic_schedule else None
                rows.append({"id": job.recurring_run_id, "name": job.display_name,
                             "status": str(job.status or job.mode or ""), "cron": cron or (f"every {every}s" if every
                                                                                            else ""),
                             "max_concurrency": job.max_concurrency})
            token = page.next_page_token or ""
            if not token:
                return rows


def delete_schedule(client: Any, recurring_run_id: str, *, host: str) -> None:
    with talking_to(host):
        client.delete_recurring_run(recurring_run_id)


def disable_schedule(client: Any, recurring_run_id: str, *, host: str) -> None:
    with talking_to(host):
        client.disable_recurring_run(recurring_run_id)


# --- the `distillery submit` / `distillery schedule` commands (their parsers: pipelines/cli.py) ---


def _package(args: Any, overrides: dict[str, Any], folder: str, command: str) -> Path:
    """Compile the pipeline (with the cluster settings) into `folder` for upload, as `distillery
    compile` does, and say what it asks of the cluster."""
    from pipelines.pipeline import compile_pipeline

    package = Path(folder) / "pipeline.yaml"
    asks = compile_pipeline(str(package), args.params, args.preset, overrides, cpu=args.cpu)
    print(f"{command}: the pipeline {asks}", flush=True)
    return package


def _client(args: Any) -> tuple[Any, str]:
    """(kfp.Client, host) from --host, --token-env, --namespace."""
    import os

    host = check_host(args.host)
    token = None
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            raise ConfigError(f"--token-env {args.token_env}: the environment has no {args.token_env} (or it is empty)")
    return connect(host, token, args.namespace), host


def _run_params(args: Any) -> dict[str, Any]:
    return {"source_uri": args.source} if args.source else {}


def command_submit(args: Any, overrides: dict[str, Any]) -> None:
    """`distillery submit`: compile (with `overrides`, --set), upload, run; print the run's id and URL."""
    import tempfile

    check_host(args.host)
    run_name = args.run_name or f"{args.pipeline_name} {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC"
    with tempfile.TemporaryDirectory() as folder:
        package = _package(args, overrides, folder, "submit")  # a parameter error stops us before any request
        client, host = _client(args)
        result = submit(client, package, host=host, pipeline_name=args.pipeline_name, experiment=args.experiment,
                        run_name=run_name, namespace=args.namespace, params=_run_params(args), wait=args.wait,
                        timeout_s=args.timeout)
    print(f"submit: pipeline {args.pipeline_name} version {result['version']} ({result['version_id']})")
    print(f"submit: run {result['run_id']} in experiment {args.experiment}: {result['url']}")
    if "state" in result:
        print(f"submit: run {result['run_id']} {result['state']}")


def command_schedule(args: Any, overrides: Any) -> None:
    """`distillery schedule`: --cron (compile, upload, recurring run), --list, --delete, --disable;
    `overrides` gives --set's mapping when a compile needs it."""
    import tempfile

    check_host(args.host)
    if args.list or args.delete or args.disable:
        client, host = _client(args)
        if args.list:
            rows = list_schedules(client, host=host, namespace=args.namespace)
            for row in rows:
                print(f"{row['id']}  {row['status']:<9} {row['cron']:<22} max {row['max_concurrency']}  {row['name']}")
            print(f"schedule: {len(rows)} recurring run(s) at {host}")
        elif args.delete:
            delete_schedule(client, args.delete, host=host)
            print(f"schedule: deleted recurring run {args.delete}")
        else:
            disable_schedule(client, args.disable, host=host)
            print(f"schedule: disabled recurring run {args.disable} (enable it again in the UI)")
        return
    cron, note = normalize_cron(args.cron)  # every check before the first request
    start, end = rfc3339(args.start, "--start"), rfc3339(args.end, "--end")
    if start and end and end <= start:
        raise ConfigError(f"--end {args.end}: not after --start {args.start}")
    if not 1 <= args.max_concurrency <= MAX_CONCURRENCY:
        raise ConfigError(f"--max-concurrency {args.max_concurrency}: KFP takes 1 to {MAX_CONCURRENCY}")
    if note:
        print(note)
    with tempfile.TemporaryDirectory() as folder:
        package = _package(args, overrides(), folder, "schedule")
        client, host = _client(args)
        result = schedule(client, package, host=host, cron=cron, name=args.name, pipeline_name=args.pipeline_name,
                          experiment=args.experiment, namespace=args.namespace, max_concurrency=args.max_concurrency,
                          catchup=args.catchup, start=start, end=end, params=_run_params(args))
    print(f"schedule: pipeline {args.pipeline_name} version {result['version']} ({result['version_id']})")
    print(f"schedule: recurring run {result['recurring_run_id']} on {cron!r} (UTC), at most {args.max_concurrency} "
          f"at a time, {'catching up' if args.catchup else 'no catch-up'}: {result['url']}")
