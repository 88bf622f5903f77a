"""The component images: Dockerfile (CPU) and Dockerfile.cuda, parsed and checked, and the parser.

    .venv/bin/python -m pytest -q tests/manifests/test_dockerfiles.py

Checked in both: base images pinned by tag or digest (never `latest`), torch pinned to the
version pyproject.toml pins, deepspeed installed with --no-build-isolation after torch, a
numeric non-root USER equal to the manifests' runAsUser, no secret-looking ENV / ARG, ENTRYPOINT
["distillery"], every COPY source present in the repository and not excluded by .dockerignore.
The CUDA variant installs torch from a CUDA index (never the CPU one) and leaves DS_ACCELERATOR
unset; the CPU one uses the CPU index and DS_ACCELERATOR=cpu. The parser has property tests.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import shlex
import tomllib

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from dockerfile_parser import DockerfileError, env_pairs, image_ref, json_args, parse, shell_commands
from k8s_schemas import MANIFESTS, REPO
from k8s_security import SECRET_NAME
from pipelines import jobs

DOCKERFILES = {"cpu": REPO / "Dockerfile", "cuda": REPO / "Dockerfile.cuda"}
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def instructions(variant):
    """The variant's instructions with ${ARG} / $ARG references replaced by the ARG defaults
    (what a plain `docker build` uses)."""
    args: dict[str, str] = {}
    out = []
    for ins in parse(DOCKERFILES[variant].read_text(encoding="utf-8")):
        value = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), ins.value)
        ins = dataclasses.replace(ins, value=value)
        if ins.cmd == "ARG":
            args.update({k: v for k, v in env_pairs(ins).items() if v})
        out.append(ins)
    return out


def pip_installs(ins_list):
    """(position, argv) of every `pip install` in RUN instructions, in build order."""
    out = []
    for ins in ins_list:
        if ins.cmd != "RUN":
            continue
        for command in shell_commands(ins):
            argv = shlex.split(command)
            if "pip" in argv and "install" in argv:
                out.append((len(out), argv))
    return out


def torch_pin():
    pins = [d for d in PYPROJECT["project"]["dependencies"] if re.match(r"torch\s*==", d)]
    assert len(pins) == 1, "pyproject.toml pins torch once"
    return pins[0].replace(" ", "")


@pytest.mark.parametrize("variant", DOCKERFILES)
def test_base_images_are_pinned(variant):
    stages = set()
    froms = [ins for ins in instructions(variant) if ins.cmd == "FROM"]
    assert froms
    for ins in froms:
        image, stage = image_ref(ins)
        if image in stages:
            continue  # FROM an earlier stage
        name = image.split("@")[0]
        tag = name.rsplit("/", 1)[-1].partition(":")[2]
        assert "@sha256:" in image or (tag and tag != "latest"), f"{DOCKERFILES[variant]}:{ins.line}: {image} unpinned"
        if stage:
            stages.add(stage)


@pytest.mark.parametrize("variant", DOCKERFILES)
def test_torch_then_deepspeed_then_the_suite(variant):
    installs = pip_installs(instructions(variant))
    torch = [i for i, argv in installs if torch_pin() in argv]
    assert len(torch) == 1, f"{DOCKERFILES[variant]}: install {torch_pin()} exactly once"
    deepspeed = [(i, argv) for i, argv in installs if "deepspeed" in argv]
    assert len(deepspeed) == 1
    i, argv = deepspeed[0]
    assert "--no-build-isolation" in argv and i > torch[0], "deepspeed builds against the installed torch"
    suite = [i for i, argv in installs if "." in argv]
    assert suite and suite[0] > i
    for _, argv in installs:
        unpinned = [a for a in argv if a in ("torch", "deepspeed")]
        assert not unpinned or "-c" in argv, f"{argv}: deepspeed comes from constraints.txt, torch is pinned"
    index = [argv[argv.index("--index-url") + 1] for _, argv in installs if torch_pin() in argv and "--index-url" in argv]
    text = " ".join(ins.value for ins in instructions(variant))
    env = {k: v for ins in instructions(variant) if ins.cmd == "ENV" for k, v in env_pairs(ins).items()}
    if variant == "cpu":
        assert index == ["https://download.pytorch.org/whl/cpu"]
        assert env.get("DS_ACCELERATOR") == "cpu"
    else:
        assert len(index) == 1 and re.fullmatch(r"https://download\.pytorch\.org/whl/cu1\d\d", index[0]), index
        assert "whl/cpu" not in text and "+cpu" not in text, "the CUDA image must not install torch's CPU build"
        assert "DS_ACCELERATOR" not in env
        image, _ = image_ref(next(ins for ins in instructions(variant) if ins.cmd == "FROM"))
        assert re.match(r"nvidia/cuda:1[23]\.\d+\.\d+-cudnn-(devel|runtime)-ubuntu", image), image
        assert index[0].endswith(image.split(":")[1].split(".")[0] + image.split(":")[1].split(".")[1]), \
            f"torch's CUDA index {index[0]} must match the base image's CUDA {image}"


@pytest.mark.parametrize("variant", DOCKERFILES)
def test_runs_as_the_manifests_non_root_user(variant):
    users = [ins for ins in instructions(variant) if ins.cmd == "USER"]
    assert users, "a USER instruction"
    uid, _, gid = users[-1].value.partition(":")
    assert uid.isdigit() and int(uid) != 0, "a numeric uid: the kubelet can check runAsNonRoot only then"
    assert int(uid) == jobs.RUN_AS and (not gid or int(gid) == jobs.RUN_AS)
    deployment = yaml.safe_load((MANIFESTS / "base" / "triton-deployment.yaml").read_text(encoding="utf-8"))
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid)
    creates = [ins for ins in instructions(variant) if ins.cmd == "RUN" and f"--uid {uid}" in ins.value]
    assert creates and creates[-1].line < users[-1].line


@pytest.mark.parametrize("variant", DOCKERFILES)
def test_entrypoint_and_no_secrets(variant):
    ins_list = instructions(variant)
    entry = [ins for ins in ins_list if ins.cmd == "ENTRYPOINT"]
    assert entry and json_args(entry[-1]) == ["distillery"]
    assert "distillery" in PYPROJECT["project"]["scripts"]
    for ins in ins_list:
        if ins.cmd in ("ENV", "ARG"):
            for name, value in env_pairs(ins).items():
                assert not SECRET_NAME.search(name), f"{DOCKERFILES[variant]}:{ins.line}: {ins.cmd} {name}"
                assert not re.search(r"AKIA[0-9A-Z]{16}|-----BEGIN", value)
    env = {k: v for ins in ins_list if ins.cmd == "ENV" for k, v in env_pairs(ins).items()}
    workdir = [ins.value for ins in ins_list if ins.cmd == "WORKDIR"][-1]
    copied = [tok for ins in ins_list if ins.cmd == "COPY" for tok in ins.value.split()[:-1]]
    assert env["DISTILLERY_PARAMS"] == f"{workdir}/params.yaml" and "params.yaml" in copied


def _ignored(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path.split("/")[0], p) for p in patterns)


@pytest.mark.parametrize("variant", DOCKERFILES)
def test_copy_sources_exist_and_are_in_the_context(variant):
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.startswith("#")]
    sources = []
    for ins in instructions(variant):
        if ins.cmd in ("COPY", "ADD") and "from" not in ins.flags:
            args = json_args(ins) or ins.value.split()
            sources += args[:-1]
    assert sources
    for src in sources:
        assert (REPO / src).exists(), f"{DOCKERFILES[variant]}: COPY {src}: not in the repository"
        assert not _ignored(src.rstrip("/"), patterns), f"COPY {src} is excluded by .dockerignore"
    packages = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    for pkg in packages:
        assert pkg.rstrip("*") + "/" in sources, f"package {pkg} is not copied into the image"
    for must in (".venv", ".git", "runs", "*.env"):
        assert must in patterns, f".dockerignore must exclude {must}"


# ---- the parser ---------------------------------------------------------------------------------

def test_parser_reads_directives_continuations_comments_and_flags():
    text = ("# syntax=docker/dockerfile:1\n# escape=`\n\nFROM --platform=linux/amd64 python:3.11 AS build\n"
            "RUN echo a `\n  # a comment inside\n\n  && echo b\ncopy --from=build --chown=1:1 /a /b\n"
            'ENV A=1 B="two words"\nENV LEGACY some value\nENTRYPOINT ["x", "y"]\n')
    got = parse(text)
    assert [(i.cmd, i.line) for i in got] == [("FROM", 4), ("RUN", 5), ("COPY", 9), ("ENV", 10), ("ENV", 11),
                                              ("ENTRYPOINT", 12)]
    assert got[0].flags == {"platform": "linux/amd64"} and image_ref(got[0]) == ("python:3.11", "build")
    assert got[1].value == "echo a   && echo b" and shell_commands(got[1]) == ["echo a", "echo b"]
    assert parse("RUN a\\\nb \\  \n  c\n")[0].value == "ab   c"  # Docker's concatenation
    assert got[2].flags == {"from": "build", "chown": "1:1"} and got[2].value == "/a /b"
    assert env_pairs(got[3]) == {"A": "1", "B": "two words"} and env_pairs(got[4]) == {"LEGACY": "some value"}
    assert json_args(got[5]) == ["x", "y"] and json_args(got[1]) is None
    with pytest.raises(DockerfileError, match="line 1"):
        parse("FRUM x\n")
    with pytest.raises(DockerfileError, match="heredoc"):
        parse("FROM a:1\nRUN <<EOF\necho\nEOF\n")


WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_./=:", min_size=1, max_size=8)
CMDS = st.sampled_from(["RUN", "COPY", "WORKDIR", "LABEL", "EXPOSE", "USER", "run", "Copy"])


@st.composite
def dockerfiles(draw):
    """A Dockerfile with random instructions, continuations, comments and blank lines, and the
    (keyword, value, line) triples Docker reads from it: a continuation removes the escape
    character and the blanks after it and appends the next line as it is, so the blanks before
    the escape and the next line's indentation are what separates two words (nothing: they join)."""
    lines, expected = [], []
    for _ in range(draw(st.integers(1, 6))):
        cmd = draw(CMDS)
        words = draw(st.lists(WORD.filter(lambda w: not w.startswith("-")), min_size=1, max_size=6))
        start = len(lines) + 1
        current, value = f"{cmd} {words[0]}", words[0]
        for word in words[1:]:
            if draw(st.booleans()):
                before, after = draw(st.sampled_from(["", " "])), draw(st.sampled_from(["", "  "]))
                lines.append(current + before + "\\" + after)
                for _ in range(draw(st.integers(0, 2))):
                    lines.append(draw(st.sampled_from(["# note", "   # indented note", "", "  "])))
                indent = draw(st.sampled_from(["", "  ", "\t"]))
                current, value = indent + word, value + before + indent + word  # no blank: one word
            else:
                current, value = current + " " + word, value + " " + word
        lines.append(current)
        expected.append((cmd.upper(), value, start))
        for _ in range(draw(st.integers(0, 2))):
            lines.append(draw(st.sampled_from(["", "# between", "  "])))
    return "\n".join(lines) + "\n", expected


@settings(max_examples=200, deadline=None)
@given(dockerfiles())
def test_parser_round_trips_generated_files(case):
    text, expected = case
    got = parse(text)
    assert [(i.cmd, i.value, i.line) for i in got] == expected


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.from_regex(r"[A-Z][A-Z0-9_]{0,8}", fullmatch=True),
                       st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126,
                                                      blacklist_characters="\\`$"), max_size=12),
                       min_size=1, max_size=5))
def test_env_pairs_round_trip(env):
    text = "FROM a:1\nENV " + " \\\n    ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + "\n"
    (ins,) = [i for i in parse(text) if i.cmd == "ENV"]
    assert env_pairs(ins) == env


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_parser_fails_only_with_its_own_error(text):
    try:
        parse(text)
    except DockerfileError:
        pass
