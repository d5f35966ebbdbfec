"""A corpus of hostile pickles ("gadgets"): each tries to create a marker file when unpickled.

Why hand-assembled opcodes: several gadgets (dotted names under an allowed module, copyreg
extension codes, protocol-0 INST) cannot be produced by ``pickle.dumps`` of ordinary objects, and
a crafted checkpoint is written by hand, not by pickle. Every gadget is a complete pickle; the
``names`` are what a safe loader must refuse (one of them must appear in its error).
"""

from __future__ import annotations

import copyreg
import pickle
import struct
from dataclasses import dataclass

PROTO4 = b"\x80\x04"
MARK, TUPLE, REDUCE, STOP, STACK_GLOBAL = b"(", b"t", b"R", b".", b"\x93"


def text(s: str) -> bytes:
    raw = s.encode()
    if len(raw) < 256:
        return b"\x8c" + bytes([len(raw)]) + raw  # SHORT_BINUNICODE
    return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


def glob(module: str, name: str) -> bytes:
    return text(module) + text(name) + STACK_GLOBAL


def call(fn: bytes, *args: bytes) -> bytes:
    return fn + MARK + b"".join(args) + TUPLE + REDUCE


def whole(expr: bytes) -> bytes:
    return PROTO4 + expr + STOP


@dataclass
class Gadget:
    name: str
    data: bytes
    refused: tuple[str, ...]  # "module.name" strings, one of which the refusal must name
    ext_code: int = 0  # a copyreg extension code the gadget relies on (registered while loading)


def corpus(marker: str) -> list[Gadget]:
    """Every gadget, each aiming at creating ``marker`` (a path)."""
    sh = f"touch {marker}"
    py = f"open({marker!r}, 'w').close()"
    os_module = call(glob("builtins", "__import__"), text("os"))
    path = call(glob("pathlib", "PosixPath"), text(marker))
    inner = whole(call(glob("os", "system"), text(sh)))  # PosixPath is on the metadata allowlist
    g: list[Gadget] = [
        Gadget("os.system", whole(call(glob("os", "system"), text(sh))), ("os.system",)),
        Gadget("posix.system", whole(call(glob("posix", "system"), text(sh))), ("posix.system",)),
        Gadget("subprocess.call", whole(call(glob("subprocess", "call"), MARK + text("touch") + text(marker) + b"l")),
               ("subprocess.call",)),
        Gadget("subprocess.Popen", whole(call(glob("subprocess", "Popen"), MARK + text("touch") + text(marker) + b"l")),
               ("subprocess.Popen",)),
        Gadget("builtins.eval", whole(call(glob("builtins", "eval"), text(py))), ("builtins.eval",)),
        Gadget("builtins.exec", whole(call(glob("builtins", "exec"), text(py))), ("builtins.exec",)),
        Gadget("builtins.open", whole(call(glob("builtins", "open"), text(marker), text("w"))), ("builtins.open",)),
        Gadget("io.open", whole(call(glob("io", "open"), text(marker), text("w"))), ("io.open",)),
        Gadget("__import__ + getattr chain",
               whole(call(call(glob("builtins", "getattr"), os_module, text("system")), text(sh))),
               ("builtins.getattr", "builtins.__import__")),
        Gadget("operator.methodcaller on an allowed PosixPath",
               whole(call(call(glob("operator", "methodcaller"), text("touch")), path)), ("operator.methodcaller",)),
        Gadget("operator.attrgetter",
               whole(call(call(call(glob("operator", "attrgetter"), text("system")), os_module), text(sh))),
               ("operator.attrgetter", "builtins.__import__")),
        Gadget("operator.itemgetter over sys.modules",
               whole(call(call(glob("builtins", "getattr"),
                               call(call(glob("operator", "itemgetter"), text("os")), glob("sys", "modules")),
                               text("system")), text(sh))),
               ("builtins.getattr", "operator.itemgetter", "sys.modules")),
        Gadget("functools.partial",
               whole(call(call(glob("functools", "partial"), glob("os", "system"), text(sh)))),
               ("functools.partial", "os.system")),
        Gadget("copyreg._reconstructor(Popen)",
               whole(call(glob("copyreg", "_reconstructor"), glob("subprocess", "Popen"), glob("subprocess", "Popen"),
                          MARK + text("touch") + text(marker) + b"l")),
               ("copyreg._reconstructor", "subprocess.Popen")),
        Gadget("copyreg extension code for os.system",
               whole(b"\x82\xf1" + MARK + text(sh) + TUPLE + REDUCE), ("os.system",), ext_code=0xF1),
        Gadget("pathlib dotted method PosixPath.touch",
               whole(call(glob("pathlib", "PosixPath.touch"), path)), ("pathlib.PosixPath.touch",)),
        Gadget("pathlib.Path.write_text",
               whole(call(glob("pathlib", "Path.write_text"), call(glob("pathlib", "Path"), text(marker)), text("x"))),
               ("pathlib.Path.write_text",)),
        Gadget("dotted name under torch.distributed.checkpoint reaching os",
               whole(call(glob("torch.distributed.checkpoint.filesystem", "os.system"), text(sh))),
               ("torch.distributed.checkpoint.filesystem.os.system",)),
        Gadget("dotted name under torch.distributed.checkpoint reaching pickle.loads",
               whole(call(glob("torch.distributed.checkpoint.filesystem", "torch.serialization.pickle.loads"),
                          b"B" + struct.pack("<I", len(inner)) + inner)),
               ("torch.distributed.checkpoint.filesystem.torch.serialization.pickle.loads",)),
        Gadget("dotted name under torch.distributed.checkpoint reaching io.open",
               whole(call(glob("torch.distributed.checkpoint.filesystem", "io.open"), text(marker), text("w"))),
               ("torch.distributed.checkpoint.filesystem.io.open",)),
        Gadget("operator.methodcaller reached through torch.distributed.checkpoint (a class)",
               whole(call(call(glob("torch.distributed.checkpoint.filesystem", "operator.methodcaller"), text("touch")),
                          path)),
               ("torch.distributed.checkpoint.filesystem.operator.methodcaller",)),
        Gadget("operator.attrgetter reached through torch.distributed.checkpoint (a class)",
               whole(call(call(call(glob("torch.distributed.checkpoint.filesystem", "operator.attrgetter"),
                                    text("touch")), path))),
               ("torch.distributed.checkpoint.filesystem.operator.attrgetter",)),
        Gadget("torch.serialization dotted os",
               whole(call(glob("torch.serialization", "os.system"), text(sh))), ("torch.serialization.os.system",)),
        Gadget("timeit.timeit", whole(call(glob("timeit", "timeit"), text(py), text("pass"),
                                            glob("time", "perf_counter"), b"K\x01")),
               ("timeit.timeit",)),
        Gadget("protocol-0 INST", f"(S'{sh}'\nios\nsystem\n.".encode(), ("os.system",)),
        Gadget("protocol-0 GLOBAL + REDUCE", f"cos\nsystem\n(S'{sh}'\ntR.".encode(), ("os.system",)),
        Gadget("OBJ opcode with Popen",
               PROTO4 + MARK + glob("subprocess", "Popen") + MARK + text("touch") + text(marker) + b"l" + b"o" + STOP,
               ("subprocess.Popen",)),
        Gadget("nested in a dict of good values",
               whole(b"}" + MARK + text("step") + b"K\x07" + text("state") + call(glob("os", "system"), text(sh))
                     + b"u"), ("os.system",)),
    ]
    return g


class extension_registered:
    """Register a gadget's copyreg extension code while it loads (as a crafted environment could)."""

    def __init__(self, gadget: Gadget) -> None:
        self.code = gadget.ext_code

    def __enter__(self):
        if self.code:
            copyreg.add_extension("os", "system", self.code)
        return self

    def __exit__(self, *exc) -> None:
        if self.code:
            copyreg.remove_extension("os", "system", self.code)
