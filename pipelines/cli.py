"""The `distillery` command: every step, the whole pipeline locally, and its compilation.

    distillery run --preset tiny --out runs/tiny           # the whole DAG with kfp.local
    distillery data generate --out data/sample/raw.jsonl --rows 2000 --noise 0.2
    distillery validate data/sample/raw.jsonl --out data/validated
    distillery filter data/validated/clean.jsonl --out data/filtered
    distillery split data/filtered/kept.jsonl --out data/split
    distillery train --stage base --data data/split --out data/base   # DeepSpeed; again to resume
    distillery train --stage reinforce --init data/base/model --data data/split --out data/reinforce
    distillery train --stage finetune --init data/reinforce/model --data data/split --out data/finetune
    distillery evaluate --checkpoint base=data/base/model --checkpoint reinforce=data/reinforce/model \
        --data data/split --out data/evaluate
    distillery distill --teacher data/finetune/model --data data/split --out data/distill
    distillery quantize --checkpoint data/distill/model --data data/split --out data/quantize
    distillery generate --checkpoint data/finetune/model --prompt "Ann has 3 apples. ..."
    distillery export --checkpoint data/quantize/model --repository data/triton   # Triton model repository
    distillery check --repository data/triton --out data/serve     # a real tritonserver: check + load test
    distillery release --model data/quantize/model --check data/serve/check.json --out data/release
    distillery promote v0.0.2 --to production                       # the registry (GTO tags); rollback too
    distillery serve --repository runs/triton --stage production    # serving follows the stage
    distillery compile --out pipeline.yaml                  # IR YAML for the Kubeflow UI (cluster settings in)
    distillery compile --cpu --out pipeline.yaml            # ... for a cluster without GPUs
    distillery submit --host http://localhost:8080 [--wait]   # upload (a new version) and run on Kubeflow
    distillery schedule --host http://localhost:8080 --cron "0 3 * * 1"   # recurring retraining; --list
    distillery render-job --stage base --out job.yaml        # the distributed training job (PyTorchJob/TrainJob)
    distillery params --preset tiny                         # the resolved parameters
    distillery ops [--build deepspeed_shm_comm]             # DeepSpeed's C++ op builds: dead locks cleared

This module is the one command-line parser; each command's function (cmd_*) calls the step's
function in components/ or pipelines/.

Every command reads params.yaml as it is (`--params FILE`), or composes a preset from conf/
(`--preset tiny`, as `dvc exp run -S preset=tiny` does), and takes overrides (`--set filter.folds=3`). Bad input or parameters end with one line naming the file, line or
key, exit status 2 (parameters) or 1 (data), and no output written. DVC's stages and the KFP
components call the same step functions as these commands.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

from components.config import ConfigError, deep_merge, load_yaml  # noqa: E402
from components.errors import command, excerpt  # noqa: E402
from pipelines.params import PipelineParams, load_params  # noqa: E402


def _yaml_value(text: str, key: str) -> Any:
    """A `--set` value as YAML reads it (within the bounds of params files: no aliases, ...),
    except that numbers in exponent form without a dot, which YAML 1.1 reads as text ("1e-3"),
    are numbers, as anyone typing them means."""
    value = load_yaml(text, f"--set {key}")
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
        return float(value)
    return value


def _overrides(pairs: list[str]) -> dict[str, Any]:
    """`--set a.b=value` pairs as a nested mapping; values are parsed as YAML (3, 0.5, true, [1, 2])."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", part) for part in parts) or len(parts) > 8:
            raise ConfigError(f"--set {excerpt(pair)}: expected KEY=VALUE with a dotted key of names, "
                              f"e.g. filter.folds=3")
        node: dict[str, Any] = {}
        leaf = node
        for part in parts[:-1]:
            leaf[part] = {}
            leaf = leaf[part]
        leaf[parts[-1]] = _yaml_value(value, key.strip())
        out = deep_merge(out, node)
    return out


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line with status 2, like every other parameter error
    (its subcommands' parsers are of the same class)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: parameter error: {message} (see {self.prog} --help)\n")


def _writable(path: str, option: str) -> None:
    """Refuse, before any work, an output path that cannot be made: under a file, or in a folder
    this process may not write (tried for real: a temporary folder made and removed)."""
    import tempfile

    if not str(path).strip():
        raise ConfigError(f"{option}: empty; give a path")
    target = Path(path).absolute()
    folder = target if target.is_dir() else target.parent
    while not folder.exists() and not folder.is_symlink():
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"{option} {path}: cannot be created: {folder} is not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".distillery-probe-", dir=folder))
    except OSError as err:
        raise ConfigError(f"{option} {path}: cannot be written: {folder}: {err.strerror}") from None


def _params(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> PipelineParams:
    overrides = deep_merge(_overrides(args.set), extra or {})
    if getattr(args, "registry", None):  # --registry on the commands that use one: registry.root
        overrides = deep_merge(overrides, {"registry": {"root": args.registry}})
    params, _ = load_params(args.params, args.preset, overrides)
    return params


def _report(step: str, metrics: dict[str, Any], out: Path) -> None:
    from pipelines.console import number

    print(f"{step}: " + ", ".join(f"{k}={number(v)}" for k, v in metrics.items()))
    print(f"{step}: wrote {out}")


def cmd_generate(args: argparse.Namespace) -> None:
    from components.data import generate

    extra = {k: v for k, v in (("rows", args.rows), ("noise", args.noise), ("seed", args.seed)) if v is not None}
    params = _params(args, {"generate": extra})
    _report("generate", generate.run(params.generate, args.out), Path(args.out))


def cmd_ingest(args: argparse.Namespace) -> None:
    from components.data import ingest

    _report("ingest", ingest.run(args.input, _params(args).source, args.out), Path(args.out))


def cmd_validate(args: argparse.Namespace) -> None:
    from components.data import validate

    params = _params(args)
    _report("validate", validate.run(args.input, params.validate, args.out, params.source), Path(args.out))


def cmd_filter(args: argparse.Namespace) -> None:
    from components.data import filter as data_filter

    _report("filter", data_filter.run(args.input, _params(args).filter, args.out), Path(args.out))


def cmd_split(args: argparse.Namespace) -> None:
    from components.data import split

    _report("split", split.run(args.input, _params(args).split, args.out), Path(args.out))


def cmd_train(args: argparse.Namespace) -> None:
    from components.data.load import DataError
    from components.train import launch, stages

    params = _params(args)
    if args.stage == "base":
        if (args.data is None) == (args.text is None):
            raise DataError("train --stage base: give --data (a split folder) or --text (a corpus), one of them")
        summary = launch.run_base(params.model, params.train, params.tokenizer, args.out, data_dir=args.data,
                                  text=args.text, fresh=args.fresh, init_dir=args.init)
    else:
        if args.init is None or args.data is None:
            raise DataError(f"train --stage {args.stage}: give --init (the previous stage's model folder, "
                            f"e.g. runs/base/model) and --data (a split folder)")
        run = stages.run_reinforce if args.stage == "reinforce" else stages.run_finetune
        summary = run(getattr(params, args.stage), args.init, args.data, args.out, fresh=args.fresh)
    _report(f"train {args.stage}", summary, Path(args.out))


def cmd_generate_text(args: argparse.Namespace) -> None:
    import torch

    from components.model.folder import load_model

    model, tok = load_model(args.checkpoint)
    ids = tok.encode(args.prompt) if args.raw else tok.prompt_ids(args.prompt)
    if not ids:
        raise ConfigError("--prompt: empty")
    room = model.cfg.block_size - 1
    ids = ids[-room:]
    g = torch.Generator().manual_seed(args.seed)
    out = model.generate(torch.tensor([ids] * args.samples), min(args.max_new_tokens, model.cfg.block_size - len(ids)),
                         temperature=args.temperature, top_k=args.top_k or None, eos_id=tok.eos_ids, generator=g)
    for i, row in enumerate(out[:, len(ids):].tolist()):
        text = tok.decode(tok.until_eos(row))
        print(("" if args.samples == 1 else f"--- sample {i + 1}\n") + text)


def cmd_model(args: argparse.Namespace) -> None:
    import shlex

    from components.model import hf
    from pipelines.local import invocation, shown

    if args.model_command == "import":
        out = hf.import_model(args.source, args.out, args.max_seq_len)
        manifest = json.loads((out / "manifest.json").read_text())
        print(f"model import: {manifest['architecture']}, {manifest['parameters'] / 1e6:.1f}M parameters")
        print(f"model import: wrote {shown(out)}; try: {invocation()} generate --checkpoint "
              f"{shlex.quote(shown(out))} --prompt 'What is 12 + 30?'")
    else:
        out = hf.export_hf(args.model, args.out, args.dtype, int(args.shard_mb * 1024 * 1024))
        print(f"model export-hf: wrote {shown(out)} (transformers: AutoModelForCausalLM.from_pretrained"
              f"({str(shown(out))!r}); vLLM: vllm serve {shlex.quote(shown(out))})")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from components.train import evaluate

    stages = {}
    for item in args.checkpoint:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ConfigError(f"--checkpoint {item!r}: expected NAME=MODEL_FOLDER, e.g. base=runs/base/model")
        stages[name] = folder
    summary = evaluate.run(_params(args).evaluate, stages, args.data, args.out)
    _report("evaluate", summary, Path(args.out))


def cmd_distill(args: argparse.Namespace) -> None:
    from components.compress import distill

    summary = distill.run(_params(args).distill, args.teacher, args.data, args.out, fresh=args.fresh,
                          student_dir=args.student)
    _report("distill", summary, Path(args.out))


def cmd_quantize(args: argparse.Namespace) -> None:
    from components.compress import quantize

    summary = quantize.run(_params(args).quantize, args.checkpoint, args.data, args.out)
    _report("quantize", summary, Path(args.out))


def cmd_export(args: argparse.Namespace) -> None:
    from components.serve import export

    cfg = _params(args).serve.export
    if args.name:
        cfg.name = args.name
    _report("export", export.run(cfg, args.checkpoint, args.repository, args.version), Path(args.repository))


def cmd_check(args: argparse.Namespace) -> None:
    from components.serve.check import run_step

    result = run_step(_params(args).serve, args.repository, args.out, args.version, args.checkpoint,
                      loadtest=not args.no_loadtest)
    print(f"check: passed over {', '.join(result['check']['protocols'])} in {result['check']['seconds']} s")
    if result["loadtest"]:
        print(result["loadtest"]["table"])
    print(f"check: wrote {args.out}")


def cmd_loadtest(args: argparse.Namespace) -> None:
    from components.serve import loadtest

    cfg = _params(args).serve
    if args.model:
        cfg.loadtest.model = args.model
    result = loadtest.run(cfg, args.repository, png=args.png)
    print(result["table"])


def _registry(args: argparse.Namespace):
    """The existing registry of params' registry.root (never made here: a typo must not make one)."""
    from components.registry.registry import Registry

    cfg = _params(args).registry
    return Registry(cfg.root, cfg, args.actor), cfg


def cmd_serve(args: argparse.Namespace) -> None:
    """Start tritonserver on a repository and keep it up until Ctrl-C; with --stage, first export
    the registry's version in that stage (serving follows the stage)."""
    import signal
    import time

    from components.serve import export
    from components.serve.server import TritonServer

    stopping = {"now": False, "interrupt": False}

    def stop(*_):
        stopping["now"] = True
        if stopping["interrupt"]:  # waiting in time.sleep: stop at once
            raise KeyboardInterrupt

    # SIGTERM (a pod's stop, `kill`) stops it as Ctrl-C does, also when it arrives while the model is
    # exported or the server starts or loads: noted then and acted on between those steps (not
    # raised inside tritonclient's gevent hub, which would print the interruption as a traceback)
    signal.signal(signal.SIGTERM, stop)
    params = _params(args)
    cfg = params.serve
    for key in ("http_port", "grpc_port", "metrics_port"):
        if getattr(args, key):
            setattr(cfg.server, key, getattr(args, key))
    repo = Path(args.repository)
    if args.stage:
        reg, rcfg = _registry(args)
        folder = reg.serving_path(rcfg.name, args.stage)
        if folder is None:
            from components.registry.errors import RegistryError

            raise RegistryError(f"--stage {args.stage}: the registry at {rcfg.root} holds no {rcfg.name} version in "
                                f"{args.stage} (distillery registry show)")
        summary = export.run(cfg.export, folder, repo)
        print(f"serve: {rcfg.name} {reg.current(rcfg.name, args.stage)} ({args.stage}) exported as version "
              f"{summary['version']} into {repo}")
    models = [f"{cfg.export.name}_{kind}" for kind in ("generate", "score")]
    server = TritonServer(repo, cfg.server, log_path=repo.parent / f"{repo.name}.tritonserver.log")
    if stopping["now"]:
        print("serve: stopped")
        return
    with server:
        try:
            for model in models:
                if stopping["now"]:
                    raise KeyboardInterrupt
                server.load(model)
            print(f"serve: tritonserver ready: HTTP {server.http_url}, gRPC {server.grpc_url}, metrics "
                  f"{server.metrics_url}; models {', '.join(models)}; log {server.log_path}", flush=True)
            if args.once:
                return
            print("serve: Ctrl-C stops it", flush=True)
            stopping["interrupt"] = True
            while not stopping["now"] and server.is_alive():
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    print("serve: stopped")


def cmd_release(args: argparse.Namespace) -> None:
    from components.registry import release

    release.run_files(_params(args).registry, args.model, args.check, args.out, args.metrics, args.loadtest,
                      args.actor)
    print((Path(args.out) / "promotion.md").read_text(), end="")


def cmd_registry(args: argparse.Namespace) -> int:
    from components.registry.cli import run

    cfg = _params(args).registry
    if args.name:
        cfg.name = args.name
    return run(args, cfg)


def cmd_compile(args: argparse.Namespace) -> None:
    from pipelines.pipeline import compile_pipeline

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    asks = compile_pipeline(str(out), args.params, args.preset, _overrides(args.set), cpu=args.cpu)
    print(f"compile: wrote {out} (upload it in the Kubeflow UI: Pipelines > Upload pipeline)")
    print(f"compile: the pipeline {asks}")


def cmd_submit(args: argparse.Namespace) -> None:
    from pipelines.submit import command_submit

    command_submit(args, _overrides(args.set))


def cmd_schedule(args: argparse.Namespace) -> None:
    from pipelines.submit import command_schedule

    command_schedule(args, lambda: _overrides(args.set))


def cmd_render_job(args: argparse.Namespace) -> None:
    from pipelines.jobs import job_name, write_job

    params = _params(args)
    path = write_job(params, args.out, args.stage, data=args.data, out=args.job_out, init=args.init, name=args.name,
                     suspend=args.suspend)
    print(f"render-job: wrote {params.cluster.job_kind} {args.name or job_name(args.stage)} to {path} "
          f"(kubectl apply -f {path})")


def cmd_run(args: argparse.Namespace) -> int:
    from components.data.load import DataError, load_rows
    from components.train.precision import native_bf16
    from pipelines.console import summary
    from pipelines.local import registry_and_next, run_local, shown
    from pipelines.pipeline import TASK_ORDER

    params = _params(args)
    if not Path(params.registry.root).is_absolute():  # a local run keeps its registry under --out
        params.registry.root = str(Path(args.out).resolve() / Path(params.registry.root).name)
    if args.source:  # read it once here: a bad file is named before any task starts
        load_rows(args.source, params.source)
    arguments = {}
    if args.base_model:
        from components.model.hf import HUB

        if not args.base_model.startswith(HUB) and not Path(args.base_model).exists():
            raise DataError(f"--base-model {args.base_model}: no such file or folder")
        arguments["base_model"] = args.base_model if args.base_model.startswith(HUB) \
            else str(Path(args.base_model).resolve())
    bf16, hardware = native_bf16()  # `auto` is decided once, here, for every training step
    stages = {"train": params.train, "reinforce": params.reinforce, "finetune": params.finetune,
              "distill": params.distill}
    for cfg in stages.values():
        if cfg.precision == "auto":
            cfg.precision = "bf16" if bf16 else "fp32"
    by_precision: dict[str, list[str]] = {}
    for name, cfg in stages.items():
        by_precision.setdefault(cfg.precision, []).append(name)
    precision = "; ".join(f"{p} for {', '.join(names)}" for p, names in by_precision.items())
    print(f"distillery run: preset {args.preset or 'from ' + str(args.params or 'params.yaml')}, "
          f"{len(TASK_ORDER)} steps into {shown(args.out)} (step logs in {shown(Path(args.out) / 'logs')})\n"
          f"precision: {precision} ({hardware})", flush=True)
    try:
        run = run_local(params, Path(args.out), source_uri=args.source or "", verbose=args.verbose,
                        arguments=arguments or None)
    except KeyboardInterrupt:
        print(f"distillery run: interrupted; the same command continues the run from where it stopped "
              f"(steps done and the last checkpoints are kept in {shown(args.out)})", file=sys.stderr)
        return 130
    registry, commands = registry_and_next(run, params, args.preset)
    latest = f"{shown(run.out / 'latest')} -> {shown(run.run_dir)}"
    print("\n".join(summary(run.steps, run.seconds, run.reports, registry, commands, latest)))


def cmd_ops(args: argparse.Namespace) -> None:
    from components.train import opbuild

    if args.build:
        print(f"ops: built {args.build} in {opbuild.build(args.build)}")
        return
    lines = opbuild.report()
    print("\n".join(lines) if lines else f"ops: no build in progress ({', '.join(opbuild.BUILDERS)})")


def cmd_params(args: argparse.Namespace) -> None:
    if args.composed:  # what DVC's Hydra writes to params.yaml for `dvc exp run -S preset=P`
        from pipelines.params import REPO_PARAMS, compose, conf_dir

        conf = conf_dir(Path(args.params or REPO_PARAMS))
        if conf is None or not args.preset or args.set:
            raise ConfigError("--composed: give --preset P (and no --set), with conf/ beside the params file")
        print(PARAMS_HEADER + yaml.safe_dump(compose(conf, args.preset), sort_keys=False), end="")
        return
    print(yaml.safe_dump(_params(args).as_dict(), sort_keys=False), end="")


PARAMS_HEADER = ("# Composed by Hydra from conf/ (config.yaml + preset/<preset>.yaml): edit those, not this file.\n"
                 "# `dvc exp run -S preset=tiny -S train.steps=50` writes it anew before each experiment;\n"
                 "# `distillery params --preset small --composed > params.yaml` writes the default again.\n")


def _registry_parsers(sub, common: argparse.ArgumentParser) -> None:
    """promote, rollback, and `registry` (init, register, current, path, show, doctor): the GTO registry."""
    from components.registry.config import STAGES

    reg_common = argparse.ArgumentParser(add_help=False, parents=[common, registry_flag()])
    reg_common.add_argument("--name", help="the model's name in the registry (registry.name)")
    reg_common.add_argument("--actor", help='who acts, "Name <email>" (default: git user, else $USER)')
    pro = sub.add_parser("promote", parents=[reg_common], help="move a registered version into a stage, through the gate")
    pro.add_argument("version", help="e.g. v0.0.2 (distillery registry show)")
    pro.add_argument("--to", choices=STAGES, default="staging")
    pro.add_argument("--note", default="", help="a note kept in the tag's message")
    pro.set_defaults(func=cmd_registry, command="promote")
    rb = sub.add_parser("rollback", parents=[reg_common], help="give a stage back to the version it held before")
    rb.add_argument("--stage", choices=STAGES, default="production")
    rb.add_argument("--note", default="", help="why, kept in the tag's message")
    rb.set_defaults(func=cmd_registry, command="rollback")
    registry = sub.add_parser("registry", help="the model registry: versions, stages, paths")
    rsub = registry.add_subparsers(dest="command", required=True)
    rsub.add_parser("init", parents=[reg_common], help="make the registry repository").set_defaults(func=cmd_registry)
    r = rsub.add_parser("register", parents=[reg_common], help="register a model folder or archive as a new version")
    r.add_argument("artifact", help="model folder, or .tar/.tar.gz/.tgz/.zip of one")
    r.add_argument("--metrics", help="metrics JSON (default: metrics.json in the model folder)")
    r.add_argument("--check", help="serve.check report JSON (default: check.json in the model folder)")
    r.add_argument("--version", help="explicit version v1.2.3 (default: the next patch version)")
    r.set_defaults(func=cmd_registry)
    for name, text in (("current", "print the version a stage holds"),
                       ("path", "print the folder of a version (or of the stage's version)")):
        c = rsub.add_parser(name, parents=[reg_common], help=text)
        c.add_argument("--stage", choices=STAGES, default="production")
        if name == "path":
            c.add_argument("--version")
        c.set_defaults(func=cmd_registry)
    rsub.add_parser("show", parents=[reg_common], help="versions, stages and stage history as JSON").set_defaults(
        func=cmd_registry)
    doc = rsub.add_parser("doctor", parents=[reg_common], help="find tags changed by hand (exit 1 while any is left)")
    doc.add_argument("--fix", action="store_true", help="put back what the registry's records allow")
    doc.set_defaults(func=cmd_registry)


def registry_flag() -> argparse.ArgumentParser:
    flag = argparse.ArgumentParser(add_help=False)
    flag.add_argument("--registry", metavar="PATH",
                      help="the registry (registry.root; `distillery run --out X` keeps it in X/registry)")
    return flag


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", help="parameters file, read as it is (default: ./params.yaml)")
    common.add_argument("--preset", help="compose tiny, small or base from conf/ (default: the params file as it is)")
    common.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one parameter, e.g. --set filter.folds=3 (repeatable)")
    common.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    parser = _Parser(prog="distillery", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the launcher puts it first
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="data sources").add_subparsers(dest="data_command", required=True)
    gen = data.add_parser("generate", parents=[common], help="write the synthetic sample set and its noise truth")
    gen.add_argument("--out", required=True, help="output .jsonl file (truth and manifest are written beside it)")
    gen.add_argument("--rows", type=int)
    gen.add_argument("--noise", type=float, help="fraction of injected noise rows, 0 to 0.9")
    gen.add_argument("--seed", type=int)
    gen.set_defaults(func=cmd_generate)
    ing = data.add_parser("ingest", parents=[common], help="a raw file through the field mapping to canonical rows")
    ing.add_argument("input")
    ing.add_argument("--out", required=True)
    ing.set_defaults(func=cmd_ingest)

    for name, func, text in (("validate", cmd_validate, "the Great Expectations gate; quarantine bad rows"),
                             ("filter", cmd_filter, "de-duplicate, filter, find label noise, weight rows"),
                             ("split", cmd_split, "deterministic train / val / test split")):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("input")
        p.add_argument("--out", required=True, help="output folder (replaced whole, only on success)")
        p.set_defaults(func=func)

    tr = sub.add_parser("train", parents=[common], help="train a stage on DeepSpeed (run again to resume)")
    tr.add_argument("--stage", choices=["base", "reinforce", "finetune"], default="base",
                    help="base (pretraining), reinforce (GRPO) or finetune (supervised, top layers)")
    tr.add_argument("--data", help="a split folder (train.jsonl, val.jsonl)")
    tr.add_argument("--text", help="base only: a plain-text corpus instead, e.g. ../shared/data/tinyshakespeare/input.txt")
    tr.add_argument("--init", help="reinforce and finetune: the previous stage's model folder, e.g. runs/base/model; "
                    "base: a model to continue pretraining (e.g. one from `distillery model import`)")
    tr.add_argument("--out", required=True, help="the stage's folder: checkpoints, metrics, model")
    tr.add_argument("--fresh", action="store_true", help="start afresh: remove the folder's earlier checkpoints")
    tr.set_defaults(func=cmd_train)

    mod = sub.add_parser("model", help="bring your own model: Hugging Face checkpoints and GGUF files in and out")
    msub = mod.add_subparsers(dest="model_command", required=True)
    imp = msub.add_parser("import", parents=[common],
                          help="a Hugging Face model folder (Llama, Qwen2, Mistral; safetensors) or a .gguf file "
                               "as a model folder every stage takes")
    imp.add_argument("source", help="a folder with config.json, *.safetensors and tokenizer.json, or a .gguf file")
    imp.add_argument("--out", required=True, help="the model folder to write (replaced only on success)")
    from components.model.hf import MAX_SEQ_LEN, SHARD_BYTES

    imp.add_argument("--max-seq-len", type=int, default=MAX_SEQ_LEN,
                     help=f"longest context kept (block_size; default {MAX_SEQ_LEN} or the checkpoint's, if less)")
    imp.set_defaults(func=cmd_model)
    exh = msub.add_parser("export-hf", parents=[common],
                          help="a model folder (any stage's; INT8 is dequantized) as a Hugging Face folder for "
                               "transformers, vLLM and Triton's vLLM backend")
    exh.add_argument("model", help="a model folder, e.g. runs/finetune/model")
    exh.add_argument("--out", required=True, help="the folder to write (replaced only on success)")
    exh.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                     help="tensor dtype (default: the imported checkpoint's own, else float32)")
    exh.add_argument("--shard-mb", type=float, default=SHARD_BYTES / 1024 / 1024,
                     help="the most MiB of tensors per safetensors file")
    exh.set_defaults(func=cmd_model)

    gen_text = sub.add_parser("generate", parents=[common], help="sample text from a stage's model folder")
    gen_text.add_argument("--checkpoint", required=True, help="a model folder, e.g. runs/reinforce/model")
    gen_text.add_argument("--prompt", required=True, help="the problem, put as in training: a newline appended, "
                          "or an imported model's chat template applied")
    gen_text.add_argument("--raw", action="store_true", help="use the prompt as it is (no newline, no chat template)")
    gen_text.add_argument("--max-new-tokens", type=int, default=64)
    gen_text.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    gen_text.add_argument("--top-k", type=int, default=0)
    gen_text.add_argument("--samples", type=int, default=1)
    gen_text.add_argument("--seed", type=int, default=0)
    gen_text.set_defaults(func=cmd_generate_text)
    ev = sub.add_parser("evaluate", parents=[common], help="held-out accuracy and perplexity of stages' models")
    ev.add_argument("--checkpoint", action="append", required=True, metavar="NAME=MODEL_FOLDER",
                    help="a stage's model folder, e.g. base=runs/base/model (repeatable, in stage order)")
    ev.add_argument("--data", required=True, help="a split folder (test.jsonl) or a .jsonl file of problems")
    ev.add_argument("--out", required=True, help="output folder: metrics.json, stages.md, stages.png")
    ev.set_defaults(func=cmd_evaluate)

    dis = sub.add_parser("distill", parents=[common], help="distill a teacher model into a smaller student")
    dis.add_argument("--teacher", required=True, help="the teacher's model folder, e.g. runs/finetune/model")
    dis.add_argument("--data", required=True, help="a split folder (train.jsonl, val.jsonl, test.jsonl)")
    dis.add_argument("--out", required=True, help="the student's folder: checkpoints, metrics, model")
    dis.add_argument("--student", help="start the student from this model folder (e.g. a smaller imported model "
                     "with the teacher's tokenizer) instead of pruning the teacher")
    dis.add_argument("--fresh", action="store_true", help="start afresh: remove the folder's earlier checkpoints")
    dis.set_defaults(func=cmd_distill)
    qua = sub.add_parser("quantize", parents=[common], help="INT8 weights and KV cache: a quantized model folder")
    qua.add_argument("--checkpoint", required=True, help="a float model folder, e.g. runs/distill/model")
    qua.add_argument("--data", help="a split folder: accuracy before/after on test.jsonl (and QAT data)")
    qua.add_argument("--out", required=True, help="output folder: model/ (INT8), metrics.json")
    qua.set_defaults(func=cmd_quantize)

    exp = sub.add_parser("export", parents=[common], help="serve.export: a Triton model repository from a model folder")
    exp.add_argument("--checkpoint", required=True, help="a model folder (float or INT8), e.g. runs/quantize/model")
    exp.add_argument("--repository", required=True, help="the model repository (a new version is added)")
    exp.add_argument("--version", type=int, help="the version number (default: the next free one)")
    exp.add_argument("--name", help="model name prefix (serve.export.name)")
    exp.set_defaults(func=cmd_export)
    chk = sub.add_parser("check", parents=[common], help="serve.check: a version in a real tritonserver, then the load test")
    chk.add_argument("--repository", required=True)
    chk.add_argument("--out", required=True, help="folder for check.json, loadtest.{json,md,png}, the server log")
    chk.add_argument("--version", type=int, help="the version to check (default: the newest)")
    chk.add_argument("--checkpoint", help="reference model folder (default: the version's own copy)")
    chk.add_argument("--no-loadtest", action="store_true", help="the check only")
    chk.set_defaults(func=cmd_check)
    lt = sub.add_parser("loadtest", parents=[common], help="concurrency sweep, batching on vs off, through tritonclient")
    lt.add_argument("--repository", required=True)
    lt.add_argument("--model", choices=["generate", "score"], help="serve.loadtest.model")
    lt.add_argument("--png", help="write the throughput/latency plot here")
    lt.set_defaults(func=cmd_loadtest)
    srv = sub.add_parser("serve", parents=[common], help="run tritonserver on a model repository until Ctrl-C")
    srv.add_argument("--repository", required=True, help="the model repository (made by export, or by --stage)")
    srv.add_argument("--stage", choices=["staging", "production"],
                     help="first export the registry's version in this stage into the repository")
    srv.add_argument("--http-port", dest="http_port", type=int, default=0, help="default: a free port")
    srv.add_argument("--grpc-port", dest="grpc_port", type=int, default=0)
    srv.add_argument("--metrics-port", dest="metrics_port", type=int, default=0)
    srv.add_argument("--once", action="store_true", help="start, load, print the endpoints and stop (a smoke test)")
    srv.add_argument("--actor", help=argparse.SUPPRESS)
    srv.add_argument("--registry", help="with --stage: the registry (registry.root; `distillery run --out X` "
                     "keeps it in X/registry)")
    srv.set_defaults(func=cmd_serve)
    rel = sub.add_parser("release", parents=[common], help="register a checked model and promote it to staging if it passes the gate")
    rel.add_argument("--model", required=True, help="the INT8 model folder, e.g. runs/quantize/model")
    rel.add_argument("--metrics", help="its metrics.json (default: the one beside the model folder)")
    rel.add_argument("--check", required=True, help="serve.check's check.json")
    rel.add_argument("--loadtest", help="serve.check's loadtest.json (latency for the gate)")
    rel.add_argument("--out", required=True, help="folder for promotion.json and promotion.md")
    rel.add_argument("--actor", help='who acts, "Name <email>" (default: git user, else $USER)')
    rel.add_argument("--registry", help="the registry (registry.root)")
    rel.set_defaults(func=cmd_release)
    _registry_parsers(sub, common)

    comp = sub.add_parser("compile", parents=[common], help="write the pipeline's IR YAML")
    comp.add_argument("--out", default="pipeline.yaml")
    from pipelines.submit import CPU_HELP

    comp.add_argument("--cpu", action="store_true", help=CPU_HELP)
    comp.set_defaults(func=cmd_compile)
    run = sub.add_parser("run", parents=[common], help="run the whole pipeline locally with kfp.local")
    run.add_argument("--out", default="runs", help="where runs go: <out>/kfp/<run>/..., <out>/latest links the newest")
    run.add_argument("--source", help="a raw data file instead of the built-in sample set")
    run.add_argument("--base-model", help="start from a pretrained model instead of from scratch: a Hugging Face "
                     "folder or .gguf file (distillery model import reads it), a model folder, or hf://org/name")
    run.add_argument("--verbose", action="store_true", help="show everything the steps print (KFP's executor "
                     "input, DeepSpeed...), not only their progress")
    run.set_defaults(func=cmd_run)
    _kfp_parsers(sub, common)
    job = sub.add_parser("render-job", parents=[common],
                         help="write the distributed training job (cluster.job_kind) and its params for kubectl")
    job.add_argument("--stage", choices=["base", "reinforce", "finetune"], default="base")
    job.add_argument("--data", help="the split folder on the cluster (default: <checkpoint_mount>/data/split)")
    job.add_argument("--init", help="reinforce / finetune: the previous model (default: <mount>/<previous>/model)")
    job.add_argument("--job-out", dest="job_out", help="the stage's folder (default: <checkpoint_mount>/<stage>)")
    job.add_argument("--name", help="the job's name (default: distillery-train-<stage>)")
    job.add_argument("--suspend", action="store_true", help="create the job suspended")
    job.add_argument("--out", required=True, help="the YAML file to write (ConfigMap + job)")
    job.set_defaults(func=cmd_render_job)
    par = sub.add_parser("params", parents=[common], help="print the resolved parameters")
    par.add_argument("--composed", action="store_true",
                     help="print the Hydra composition of --preset (what params.yaml holds), not every field")
    par.set_defaults(func=cmd_params)
    ops = sub.add_parser("ops", help="DeepSpeed's just-in-time C++ ops: clear dead builds' locks, list live builds")
    ops.add_argument("--build", metavar="OP", help="build an op now, bounded by $DISTILLERY_OP_BUILD_TIMEOUT "
                     "seconds (deepspeed_shm_comm: only DeepSpeed's inference uses it)")
    ops.set_defaults(func=cmd_ops)
    return parser


def _kfp_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """The submit and schedule subcommands, with params.yaml's --params/--preset/--set (`common`)."""
    from pipelines.cluster import PIPELINE_NAME
    from pipelines.submit import CPU_HELP, MAX_CONCURRENCY

    kfp = argparse.ArgumentParser(add_help=False, parents=[common])
    kfp.add_argument("--host", required=True, help="the KFP API / UI URL, e.g. http://localhost:8080 (a port-forward)")
    kfp.add_argument("--namespace", help="multi-user Kubeflow: your profile's namespace (default: none, single-user)")
    kfp.add_argument("--token-env", metavar="VAR", help="send the bearer token held in environment variable VAR")
    kfp.add_argument("--experiment", default=PIPELINE_NAME, help="the experiment (made if missing)")
    kfp.add_argument("--pipeline-name", default=PIPELINE_NAME, help="the pipeline (a new version is uploaded)")
    kfp.add_argument("--source", help="the run's source_uri: a data file the pods can read (default: sample set)")
    kfp.add_argument("--cpu", action="store_true", help=CPU_HELP)
    sbm = sub.add_parser("submit", parents=[kfp], help="compile, upload (a new version) and run on Kubeflow")
    sbm.add_argument("--run-name", help="default: '<pipeline> <UTC time> UTC'")
    sbm.add_argument("--wait", action="store_true", help="wait for the run to end; exit 1 unless it succeeded")
    sbm.add_argument("--timeout", type=float, default=86400, help="--wait: give up after this many seconds")
    sbm.set_defaults(func=cmd_submit)
    sch = sub.add_parser("schedule", parents=[kfp], help="a recurring run (scheduled retraining); --list, --disable")
    what = sch.add_mutually_exclusive_group(required=True)
    what.add_argument("--cron", help='"0 3 * * 1" (5 fields get "0 " first for KFP\'s seconds) or 6 fields; UTC')
    what.add_argument("--list", action="store_true", help="list the recurring runs")
    what.add_argument("--delete", metavar="ID", help="delete a recurring run")
    what.add_argument("--disable", metavar="ID", help="disable a recurring run (it stays, stopped)")
    sch.add_argument("--name", default=f"{PIPELINE_NAME} retraining", help="the recurring run's name")
    sch.add_argument("--max-concurrency", type=int, default=1, help=f"runs at once, 1 to {MAX_CONCURRENCY} (default 1)")
    sch.add_argument("--catchup", action=argparse.BooleanOptionalAction, default=False,
                     help="after a pause, run every missed slot (default: no, only the latest)")
    sch.add_argument("--start", help="first time it may run, ISO 8601 (no zone: UTC)")
    sch.add_argument("--end", help="last time it may run, ISO 8601 (no zone: UTC)")
    sch.set_defaults(func=cmd_schedule)


@command("distillery")
def main(argv: list[str] | None = None) -> int:
    """Every command: bad input or parameters end in one line and status 1 or 2 (components/errors.py)."""
    args = build_parser().parse_args(argv)
    for option, attr in (("--out", "out"), ("--repository", "repository")):
        if isinstance(getattr(args, attr, None), str) and (attr == "out" or args.func is cmd_export):
            _writable(getattr(args, attr), option)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
