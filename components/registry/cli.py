"""The registry's commands, run by `distillery` (pipelines/cli.py parses them):

    distillery registry init                                   # git init + .gto in registry.root
    distillery registry register runs/quantize/model --metrics m.json --check runs/serve/check.json
    distillery registry register model.tar.gz --metrics m.json --check check.json
    distillery promote v0.0.2 --to staging                     # gate vs production
    distillery promote v0.0.2 --to production                  # only what staging holds
    distillery rollback                                        # production: the version before
    distillery registry current --stage production             # prints v0.0.1 (exit 1: none)
    distillery registry path --stage production                # the folder serving exports
    distillery registry show                                   # versions, stages, stage history
    distillery registry doctor [--fix]                         # tags changed by hand; --fix puts them back

Settings come from the `registry` section of params.yaml (--params, --preset, --set registry.root=...),
with --name on top. Exit status: 0 done (also "unchanged"), 1 refused (gate failed, bad artifact,
nothing to roll back, tags changed by hand; the registry is unchanged), 2 bad parameters; doctor
exits 1 while a problem is left. The one-line error names the file, field or version at fault; a
failed gate prints every metric, candidate vs production.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from components.registry.config import STAGES, RegistryConfig

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip")


def run(args: argparse.Namespace, cfg: RegistryConfig) -> int:
    from components.registry.registry import Registry

    if args.command == "init":
        reg = Registry.init(cfg.root, cfg, args.actor)
        print(f"registry: {reg.root} is a model registry (stages: {', '.join(STAGES)})")
        return 0
    reg = Registry(cfg.root, cfg, args.actor)
    if args.command == "register":
        is_archive = str(args.artifact).endswith(ARCHIVE_SUFFIXES) and os.path.isfile(args.artifact)
        fn = reg.register_archive if is_archive else reg.register
        r = fn(args.artifact, cfg.name, args.metrics, args.check, version=args.version)
        print(f"registry: {r.tag} {'registered' if r.changed else 'unchanged (the same model files)'} at {r.path}")
    elif args.command == "promote":
        change = reg.promote(cfg.name, args.version, to=args.to, note=args.note)
        if change.report is not None:
            print(change.report.table())
        print(f"registry: {cfg.name} {args.to}: {change.status} {change.version}"
              + (f" (was {change.previous})" if change.previous and change.status != "unchanged" else "")
              + (f", tags {', '.join(change.tags)}" if change.tags else ""))
    elif args.command == "rollback":
        change = reg.rollback(cfg.name, args.stage, note=args.note)
        print(f"registry: {cfg.name} {args.stage}: rolled back from {change.previous} to {change.version}, "
              f"tags {', '.join(change.tags)}")
    elif args.command == "current":
        version = reg.current(cfg.name, args.stage)
        if version is None:
            print(f"registry: {cfg.name} {args.stage} holds no version", file=sys.stderr)
            return 1
        print(version)
    elif args.command == "path":
        folder = reg.path(cfg.name, args.version) if args.version else reg.serving_path(cfg.name, args.stage)
        if folder is None:
            print(f"registry: {cfg.name} {args.stage} holds no version", file=sys.stderr)
            return 1
        print(folder)
    elif args.command == "doctor":
        problems, done = reg.doctor(cfg.name, fix=args.fix)
        for line in done:
            print(f"registry: repaired {line}")
        for p in problems:
            print(f"registry: {'problem' if p.blocking else 'warning'}: {p.line()}")
        blocking = [p for p in problems if p.blocking]
        if not problems:
            print(f"registry: {cfg.name}: the tags agree with the registry's records")
        elif blocking and not args.fix and any(p.fix for p in blocking):
            print(f"registry: `distillery registry doctor --fix` repairs {sum(1 for p in problems if p.fix)} of "
                  f"{len(problems)}")
        return 1 if blocking else 0
    elif args.command == "show":
        out = {"versions": reg.versions(cfg.name),
               "stages": {s: reg.current(cfg.name, s) for s in STAGES},
               "stage_history": {s: reg.stage_stack(cfg.name, s) for s in STAGES}}
        print(json.dumps(out, indent=1))
    return 0

