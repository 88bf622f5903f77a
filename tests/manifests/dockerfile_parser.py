"""A small Dockerfile parser: instructions with their line numbers, as Docker reads them.

    from dockerfile_parser import parse, json_args, env_pairs, shell_commands
    for ins in parse(Path("Dockerfile").read_text()):
        print(ins.line, ins.cmd, ins.value)

What it handles, as BuildKit's parser does: parser directives at the top (`# escape=` picks the
continuation character, ` or \\), comment lines (also inside a continued instruction, where Docker
drops them), blank lines inside a continuation, line continuations (the escape character and
what follows it removed, the next line appended as it is, its indentation included, so the
lines `a\\` and `b` read `ab`), instruction keywords in any case, leading `--flag=value`
options (FROM --platform, COPY --from / --chown, RUN --mount). Not handled: heredocs (`RUN <<EOF`), which raise DockerfileError.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field

INSTRUCTIONS = {"ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
                "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR"}
DIRECTIVE = re.compile(r"^#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$")


class DockerfileError(ValueError):
    """Text that is not a Dockerfile this parser understands; names the line."""


@dataclass(frozen=True)
class Instruction:
    cmd: str
    """The keyword, upper case (FROM, RUN, ...)."""
    value: str
    """The arguments after the keyword and its flags, continuation lines joined with one space."""
    line: int
    """1-based line where the instruction starts."""
    flags: dict[str, str] = field(default_factory=dict)
    """Leading --name=value options (a bare --name has the value "")."""


def directives(text: str) -> dict[str, str]:
    """Parser directives: `# name=value` lines before anything else (lower-case names)."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        m = DIRECTIVE.match(raw.strip())
        if not m or m.group(1).lower() in out:
            break
        out[m.group(1).lower()] = m.group(2)
    return out


def _split_flags(cmd: str, rest: str) -> tuple[dict[str, str], str]:
    flags: dict[str, str] = {}
    if cmd not in ("FROM", "COPY", "ADD", "RUN", "HEALTHCHECK"):
        return flags, rest
    while rest.startswith("--"):
        token, remainder = (rest.split(None, 1) + [""])[:2]
        name, _, value = token[2:].partition("=")
        flags[name] = value
        rest = remainder
    return flags, rest


def parse(text: str) -> list[Instruction]:
    """The instructions of a Dockerfile, in order."""
    escape = directives(text).get("escape", "\\")
    if escape not in ("\\", "`"):
        raise DockerfileError(f"line 1: escape must be \\ or `, not {escape!r}")
    continued = re.compile(re.escape(escape) + r"[ \t]*$")
    out: list[Instruction] = []
    joined: str | None = None  # the instruction read so far, while inside a continuation
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        if raw.strip().startswith("#"):
            continue  # a comment, also inside a continuation (where Docker drops it)
        if joined is None:
            if not raw.strip():
                continue
            start, line = number, raw.lstrip()
        else:
            if not raw.strip():
                continue  # an empty continuation line
            line = joined + raw  # Docker keeps the continuation line's leading whitespace
        m = continued.search(line)
        if m:
            joined = line[:m.start()]
            continue
        out.append(_instruction(line, start))
        joined = None
    if joined is not None:  # the file ends inside a continuation: Docker accepts it
        out.append(_instruction(joined, start))
    return out


def _instruction(joined: str, line: int) -> Instruction:
    parts = joined.split(None, 1)
    keyword, rest = (parts[0] if parts else ""), (parts[1] if len(parts) > 1 else "")
    cmd = keyword.upper()
    if cmd not in INSTRUCTIONS:
        raise DockerfileError(f"line {line}: unknown instruction {keyword!r}")
    rest = rest.strip()
    if re.search(r"<<-?\s*['\"]?[A-Za-z_]", rest) and cmd in ("RUN", "COPY", "ADD"):
        raise DockerfileError(f"line {line}: heredocs are not supported")
    flags, rest = _split_flags(cmd, rest)
    return Instruction(cmd, rest, line, flags)


def json_args(ins: Instruction) -> list[str] | None:
    """The exec-form (JSON array) arguments of CMD / ENTRYPOINT / RUN / SHELL, else None."""
    if not ins.value.startswith("["):
        return None
    try:
        value = json.loads(ins.value)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def env_pairs(ins: Instruction) -> dict[str, str]:
    """ENV / ARG / LABEL as {name: value}: `K=V K2="a b"` pairs, or the legacy `ENV K some value`."""
    tokens = shlex.split(ins.value, posix=True)
    if not tokens:
        return {}
    if "=" not in tokens[0]:
        if ins.cmd == "ARG":
            return {tokens[0]: ""}
        name = ins.value.split(None, 1)[0]
        return {name: ins.value[len(name):].strip()}
    out = {}
    for token in tokens:
        name, sep, value = token.partition("=")
        if not sep and ins.cmd != "ARG":
            raise DockerfileError(f"line {ins.line}: {ins.cmd} {token!r} has no value")
        out[name] = value
    return out


def shell_commands(ins: Instruction) -> list[str]:
    """A shell-form RUN split at && ; and || into its simple commands, in order."""
    return [c.strip() for c in re.split(r"&&|\|\||;", ins.value) if c.strip()]


def image_ref(ins: Instruction) -> tuple[str, str | None]:
    """FROM's (image, stage name): `FROM [--platform=..] image [AS name]`."""
    tokens = ins.value.split()
    if len(tokens) == 3 and tokens[1].lower() == "as":
        return tokens[0], tokens[2]
    if len(tokens) != 1:
        raise DockerfileError(f"line {ins.line}: FROM {ins.value!r}: expected `image [AS name]`")
    return tokens[0], None
