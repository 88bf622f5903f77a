"""Is this file a pickle? A sound test, for files of any name, of "could unpickling it run code".

    found = scan_file("model/tokenizer/vocab.txt")   # None, or a Pickled
    str(found)   # "protocol 0, GLOBAL at byte 0 imports os.system"
    scan(b"cos\\nsystem\\n(S'echo hi'\\ntR.")        # the same test on bytes in memory

Why the test is sound. Every Python loader of pickles (pickle.load and loads, torch.load,
numpy.load with allow_pickle, joblib, dill, pandas) runs CPython's C Unpickler or
pickle._Unpickler, and both execute opcodes one at a time in file order from byte 0. The only
opcodes that reach code outside the unpickler are those that look a name up through
`find_class` (GLOBAL, STACK_GLOBAL, INST, and EXT1/EXT2/EXT4 through copyreg's extension
registry) or hand data to `persistent_load` (PERSID, BINPERSID). REDUCE, BUILD, NEWOBJ and OBJ
call only what one of those produced: every other opcode makes plain data (None, bools,
numbers, str, bytes, bytearray, list, tuple, dict, set, frozenset), and the methods the
unpickler calls on it (append, extend, __setitem__, add, hashing) run no code of the file's
choosing. So the walk below follows the opcodes from byte 0 as an unpickler does and refuses
the file when it reaches one of those opcodes, or a STOP (a complete pickle, even of plain data,
is a pickle payload). When it reaches a byte that is no opcode, the end of the file, or a step
at which both unpicklers certainly raise, no unpickler gets past that point, and the file is
not a pickle.

Why not pickletools.genops. genops reads argument values more strictly than the unpicklers do:
both unpicklers read INT's and LONG's line with base 0, so `I0x10\\n` is an int to them and a
ValueError to genops; `b"I0x10\\ncos\\nsystem\\n..."` ends genops' parse at byte 0 while
pickle.loads runs os.system (tests/registry/test_pickles.py keeps that file). The walk uses
pickletools' opcode table (codes, argument framing, stack effects) but never reads an argument's
value: a line argument is skipped to its newline, a counted one by its count. An argument that
cannot be read (the file ends first, a negative count) stops every unpickler too.

The stack, for text files. A text file that starts with "docs" is DICT, OBJ, GLOBAL to a
framing-only walk, and refusing it would be a false positive. Both unpicklers keep a stack split
into frames by MARK and raise when an opcode pops more than the current frame holds, needs a
MARK where there is none, or GETs from a memo nothing was put into (every loader makes a fresh
Unpickler per file, so the memo starts empty). The walk tracks the frame sizes and stops at
such a step. Where an older unpickler might pop across a MARK (the frame is short, the stack
below it is not), the walk stops tracking and goes on by framing alone, refusing on the opcodes
above whatever the stack holds. Likewise GLOBAL, INST and PERSID decode their lines strictly
(UTF-8 for GLOBAL's module and name, ASCII for INST's and for a persistent id) in both
unpicklers before calling anything: a line that does not decode stops them. Without that, one
safetensors file in 32 would be refused: its first byte is the low byte of the header length,
a multiple of 8, and 0x50 is PERSID.

Frames. FRAME (protocol 4) announces that its next N bytes are opcodes; both unpicklers read
them in order, so the walk goes on through a frame as through anything else. But the C
unpickler reading a file reads a frame's N bytes into a buffer and, when a read runs past the
buffer's end, drops what the frame had left and reads on from after it (measured: a FRAME of 2
bytes, then `J` with a 4-byte argument: pickle.Unpickler(io.BytesIO(...)).load() takes the
argument from after the frame, pickle.loads from inside it); pickle._Unpickler raises there.
A read across a frame's end (an argument, a line, a count, a nested frame) reads two ways, and
the file is refused there; pickles never do it (the pickler ends frames between opcodes).

Cost. One pass over the file with nothing read into memory: the file is memory-mapped, counted
arguments are stepped over (a crafted 2**60-byte length ends the walk, it is never allocated)
and newlines are found by mmap.find. A walk longer than MAX_OPCODES opcodes is refused unread
to the end (measured 1.2 million opcodes/s on one core, so under a second a file): no JSON,
safetensors or text file holds a million consecutive opcodes the stack accepts.

Not covered here: files that are not pickles from byte 0 but that some loader unpacks into one
(torch.save's zip, a .npy with object arrays, a tar of torch's legacy format, the compressed
streams joblib.load inflates whatever the file's name); artifact.sniff refuses those by their
magic bytes.
"""

from __future__ import annotations

import codecs
import mmap
import os
import pickletools
from dataclasses import dataclass, replace

MAX_OPCODES = 1 << 20
"""A walk that reaches this many opcodes is refused (a pickle of a million items, or a file made
to keep the walk busy)."""

FIND = frozenset({"GLOBAL", "INST", "EXT1", "EXT2", "EXT4", "PERSID"})
"""Opcodes that call find_class or persistent_load before they touch the stack."""
FIND_FROM_STACK = {"STACK_GLOBAL": 2, "BINPERSID": 1}
"""Opcodes that pop their name (module and name, or the persistent id) first: with fewer items
on the stack both unpicklers raise before calling anything."""
STRINGS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "SHORT_BINSTRING",
                     "BINSTRING"})
"""Opcodes that push a string, remembered only to name what a STACK_GLOBAL imports."""
QUIET = frozenset({"PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"})
"""Opcodes that leave the top of the stack as it is."""
_COUNT_WIDTH = {pickletools.TAKEN_FROM_ARGUMENT1: (1, False), pickletools.TAKEN_FROM_ARGUMENT4: (4, True),
                pickletools.TAKEN_FROM_ARGUMENT4U: (4, False), pickletools.TAKEN_FROM_ARGUMENT8U: (8, False)}


@dataclass(frozen=True)
class Pickled:
    """Why a file is a pickle payload: the protocol it claims (PROTO) or needs, the opcode, where."""

    protocol: int
    opcode: str
    offset: int
    what: str

    def __str__(self) -> str:
        return f"protocol {self.protocol}, {self.opcode} at byte {self.offset} {self.what}"


@dataclass(frozen=True)
class _Op:
    name: str
    proto: int
    arg: int | None
    """pickletools' argument size: >= 0 bytes, UP_TO_NEWLINE, or a TAKEN_FROM_ARGUMENT* count."""
    pops: int
    """Items taken from the current frame (for a MARK opcode: from the frame below the MARK)."""
    pushes: int
    mark: bool
    """Pops a MARK and everything above it."""
    above: int
    """Items a MARK opcode needs above its MARK (OBJ: the class)."""


def _op(info: pickletools.OpcodeInfo) -> _Op:
    before = list(info.stack_before)
    mark = pickletools.markobject in before
    if mark:
        at = before.index(pickletools.markobject)
        above = sum(1 for s in before[at + 1:] if s is not pickletools.stackslice)
        before = before[:at]
    else:
        above = 0
    after = [s for s in info.stack_after if s is not pickletools.markobject]
    return _Op(info.name, info.proto, info.arg.n if info.arg else None, len(before), len(after), mark, above)


OPS: dict[int, _Op] = {ord(info.code): _op(info) for info in pickletools.opcodes}
"""byte -> opcode, from pickletools' table (the one description of the format CPython ships)."""
for _code, _info in list(OPS.items()):
    if _info.name in ("PUT", "BINPUT", "LONG_BINPUT"):  # pickletools lists them as stack-neutral; they
        OPS[_code] = replace(_info, pops=1, pushes=1)    # read the top item: both unpicklers raise on an empty frame


def _text(raw: bytes, limit: int = 80) -> str:
    """Bytes of a name shown in a one-line message: printable ASCII, others as '?'."""
    text = raw[:limit].decode("utf-8", "replace")
    return "".join(c if c.isprintable() and c.isascii() else "?" for c in text) + ("..." if len(raw) > limit else "")


def _line_end(data, pos: int) -> int:
    """Where the line from `pos` ends (after its newline; the end of the file for the last line)."""
    newline = data.find(b"\n", pos)
    return len(data) if newline < 0 else newline + 1


def _decodes(data, start: int, end: int, encoding: str) -> bool:
    """Whether what readline()[:-1] gives for the line data[start:end] decodes strictly, read in
    1 MiB blocks (a line may be the whole file)."""
    decoder = codecs.getincrementaldecoder(encoding)("strict")
    try:
        for at in range(start, end - 1, 1 << 20):
            decoder.decode(bytes(data[at:min(at + (1 << 20), end - 1)]))
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def scan(data) -> Pickled | None:
    """Walk `data` (bytes or an mmap) from byte 0 as an unpickler would; see the module docstring.

    Returns None when every unpickler stops before calling find_class or persistent_load and
    before completing a pickle; otherwise what the walk reached."""
    size = len(data)
    pos = 0
    frames = [0]  # items above each MARK; frames[0]: items below the first MARK
    depth = 0  # sum(frames)
    memo = False  # something was put into the memo
    tracking = True  # the stack is known exactly (see "The stack" in the module docstring)
    proto = None
    needed = 0  # the highest protocol of the opcodes walked
    recent: list[str | None] = [None, None]  # the last two pushed strings, for STACK_GLOBAL's message
    frame_end = None  # where the FRAME being read ends (see "Frames" in the module docstring)

    def crosses(a: int, b: int) -> bool:
        return frame_end is not None and a < frame_end < b

    def found(op: _Op, start: int, what: str) -> Pickled:
        return Pickled(proto if proto is not None else needed, op.name, start, what)

    for _ in range(MAX_OPCODES):
        if frame_end is not None and pos >= frame_end:
            frame_end = None
        if pos >= size:
            return None
        op = OPS.get(data[pos])
        if op is None:
            return None  # no such opcode: "invalid load key"
        start, pos = pos, pos + 1
        needed = max(needed, op.proto)
        name = op.name
        if name in FIND:
            # GLOBAL (utf-8), INST and PERSID (ascii) decode their lines strictly, in both unpicklers,
            # before find_class or persistent_load: a line that does not decode stops them first
            lines = 1 if name == "PERSID" else 2 if name in ("GLOBAL", "INST") else 0
            encoding = "utf-8" if name == "GLOBAL" else "ascii"
            ends, known = [pos], True
            for _ in range(lines):
                ends.append(_line_end(data, ends[-1]))
                known = known and not crosses(ends[-2], ends[-1])  # else the C unpickler reads another line
                if known and not _decodes(data, ends[-2], ends[-1], encoding):
                    return None
            if lines == 2:
                module, attr = (bytes(data[a:min(b - 1, a + 200)]) for a, b in zip(ends, ends[1:]))
                what = f"imports {_text(module)}.{_text(attr)}"
            elif lines == 1:
                what = "calls the loader's persistent_load"
            else:
                width = int(name[-1])
                what = f"imports extension code {int.from_bytes(bytes(data[pos:pos + width]), 'little')} of copyreg"
            return found(op, start, what)
        # the argument: stepped over by its framing, never read for its value
        n = op.arg
        if n is None:
            end = pos
        elif n >= 0:
            end = pos + n
        elif n == pickletools.UP_TO_NEWLINE:
            newline = data.find(b"\n", pos)
            if newline < 0:
                return None  # the last line: whatever it holds, the next read finds the end of the file
            end = newline + 1
        else:
            width, signed = _COUNT_WIDTH[n]
            if pos + width > size:
                return None
            if crosses(pos, pos + width):
                return found(op, start, f"reads across the end of the frame ending at byte {frame_end}")
            count = int.from_bytes(bytes(data[pos:pos + width]), "little", signed=signed)
            if count < 0:
                return None  # BINSTRING / LONG4 with a negative count: both unpicklers raise
            pos += width
            end = pos + count
        if end > size:
            return None  # the argument runs past the end of the file
        if crosses(pos, end):
            return found(op, start, f"reads across the end of the frame ending at byte {frame_end}")
        if name == "FRAME":
            length = int.from_bytes(bytes(data[pos:end]), "little")
            if frame_end is not None and end + length > frame_end:
                return found(op, start, f"reads across the end of the frame ending at byte {frame_end}")
            if frame_end is None and end + length <= size:  # past the end: the C unpickler raises here
                frame_end = end + length
        if name == "PROTO":
            proto = data[pos]
        arg, pos = pos, end  # the argument's bytes are data[arg:pos]

        if name == "STOP" or name in FIND_FROM_STACK:
            k = FIND_FROM_STACK.get(name, 1)
            if tracking and depth < k:
                return None  # pops from an empty stack: the unpickler raises first
            if name == "STOP":
                return found(op, start, "ends a complete pickle")
            if name == "BINPERSID":
                return found(op, start, "calls the loader's persistent_load")
            module, attr = recent
            return found(op, start, f"imports {module}.{attr}" if module and attr else "imports a name from the stack")
        if name in STRINGS:
            recent = [recent[-1], _text(bytes(data[arg:min(pos, arg + 200)]).strip(b"\n'\""))]
        elif name not in QUIET and op.pushes:
            recent = [recent[-1], None]
        if not tracking:
            continue
        if name == "MARK":
            frames.append(0)
        elif name == "POP":  # pops an item, or else the MARK itself
            if frames[-1]:
                frames[-1] -= 1
                depth -= 1
            elif len(frames) > 1:
                frames.pop()
            else:
                return None
        elif op.mark:
            if len(frames) == 1 or frames[-1] < op.above:
                return None  # "could not find MARK" / nothing above it
            depth -= frames.pop()
        elif name in ("GET", "BINGET", "LONG_BINGET") and not memo:
            return None  # "Memo value not found"
        if op.mark or name not in ("MARK", "POP"):
            if frames[-1] < op.pops:
                if depth < op.pops:
                    return None  # stack underflow in every unpickler
                tracking = False  # only across a MARK: stop tracking, go on by framing
                continue
            frames[-1] += op.pushes - op.pops
            depth += op.pushes - op.pops
            if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                memo = True
    return found(op, start, f"continues an unbroken stream of {MAX_OPCODES:,} opcodes")


def scan_file(path: str | os.PathLike) -> Pickled | None:
    """`scan` of a file's bytes, memory-mapped (nothing but the pages walked is read)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return None
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return scan(data)
