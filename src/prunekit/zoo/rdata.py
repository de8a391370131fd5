"""A small, safe reader of R's XDR serialization (``.rds`` streams and lazy-load ``.rdx``/``.rdb`` databases).

R packages ship their data sets as a lazy-load database: ``Rdata.rdx`` is a gzip'd serialized list
(``variables``: name -> (offset, length) into ``Rdata.rdb``, ``references``, ``compressed``) and each
record of ``Rdata.rdb`` is a 4-byte big-endian uncompressed length followed by the zlib stream of one
serialized object. Only what plain data needs is understood:

* NULL, symbols, pairlists (the attribute lists), strings (``CHARSXP``: UTF-8, latin-1, ASCII, native,
  bytes and ``NA``), character / integer / logical / double / complex / raw vectors, lists
  (``VECSXP``/``EXPRSXP``), references to symbols read earlier, and the empty / global / base
  environments as markers.
* Anything else (closures, environments, promises, byte code, external pointers, S4 objects, ALTREP
  classes other than the compact sequences and wrappers R writes for plain vectors) is refused with a
  :class:`~prunekit.errors.PrunekitError` naming the type, never guessed at.

Nothing is evaluated and nothing is allocated beyond what the bytes can hold: every length is checked
against the bytes left before anything is read, nesting is bounded, and a compressed record may not
inflate past its declared length (itself bounded).

    db = read_lazyload_db("Rdata.rdx", "Rdata.rdb")          # {name: RVector, ...}
    db["prideprejudice"].values[:3]                          # ['PRIDE AND PREJUDICE', '', 'By Jane Austen']
"""
from __future__ import annotations

import codecs
import math
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from prunekit.errors import PrunekitError

__all__ = [
    "MAX_DEPTH",
    "MAX_INFLATED",
    "MAX_SEQUENCE",
    "REnvironment",
    "RPairList",
    "RSymbol",
    "RVector",
    "read_lazyload_db",
    "read_rds_bytes",
    "unserialize",
]

MAX_DEPTH = 256            # nested lists / attributes deeper than this are refused
MAX_INFLATED = 1 << 30     # no compressed record or index may inflate past 1 GiB
MAX_SEQUENCE = 1 << 24     # nor may a compact sequence (ALTREP 1:n) expand past this many elements

# SEXP type codes (R's Rinternals.h) and the pseudo types of serialize.c
NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
SPECIALSXP, BUILTINSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, CPLXSXP = 7, 8, 9, 10, 13, 14, 15
STRSXP, DOTSXP, VECSXP, EXPRSXP, BCODESXP, EXTPTRSXP, WEAKREFSXP, RAWSXP, S4SXP = 16, 17, 19, 20, 21, 22, 23, 24, 25
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP, MISSINGARG_SXP, BASENAMESPACE_SXP = 255, 254, 253, 252, 251, 250
NAMESPACESXP, PACKAGESXP, PERSISTSXP, EMPTYENV_SXP, BASEENV_SXP, ALTREP_SXP = 249, 248, 247, 242, 241, 238

_TYPE_NAMES = {
    NILSXP: "NILSXP", SYMSXP: "SYMSXP", LISTSXP: "LISTSXP", CLOSXP: "CLOSXP", ENVSXP: "ENVSXP",
    PROMSXP: "PROMSXP", LANGSXP: "LANGSXP", SPECIALSXP: "SPECIALSXP", BUILTINSXP: "BUILTINSXP",
    CHARSXP: "CHARSXP", LGLSXP: "LGLSXP", INTSXP: "INTSXP", REALSXP: "REALSXP", CPLXSXP: "CPLXSXP",
    STRSXP: "STRSXP", DOTSXP: "DOTSXP", VECSXP: "VECSXP", EXPRSXP: "EXPRSXP", BCODESXP: "BCODESXP",
    EXTPTRSXP: "EXTPTRSXP", WEAKREFSXP: "WEAKREFSXP", RAWSXP: "RAWSXP", S4SXP: "S4SXP",
    NAMESPACESXP: "NAMESPACESXP", PACKAGESXP: "PACKAGESXP", PERSISTSXP: "PERSISTSXP",
    ALTREP_SXP: "ALTREP_SXP", 246: "CLASSREFSXP", 245: "GENERICREFSXP", 244: "BCREPDEF",
    243: "BCREPREF", 240: "ATTRLANGSXP", 239: "ATTRLISTSXP", UNBOUNDVALUE_SXP: "UNBOUNDVALUE_SXP",
    MISSINGARG_SXP: "MISSINGARG_SXP", BASENAMESPACE_SXP: "BASENAMESPACE_SXP",
}
_VECTOR_KINDS = {LGLSXP: "logical", INTSXP: "integer", REALSXP: "double", CPLXSXP: "complex",
                 STRSXP: "character", VECSXP: "list", EXPRSXP: "expression", RAWSXP: "raw"}

# CHARSXP encoding bits (the "levels" of the flags word)
_BYTES_MASK, _LATIN1_MASK, _UTF8_MASK, _ASCII_MASK = 1 << 1, 1 << 2, 1 << 3, 1 << 6
_NA_INTEGER = -(1 << 31)


@dataclass(frozen=True)
class RSymbol:
    """An R symbol (a name): attribute tags, list tags."""
    name: str


@dataclass(frozen=True)
class REnvironment:
    """A marker for one of R's fixed environments (``global``, ``base``, ``empty``, ``base namespace``)."""
    name: str


@dataclass
class RVector:
    """An R vector: ``kind`` is R's ``typeof`` ("character", "integer", "logical", "double", "complex",
    "raw", "list", "expression"); ``values`` a Python list (``bytes`` for raw) with ``None`` for NA
    (double NA stays a NaN); ``attributes`` maps attribute names to their values."""
    kind: str
    values: Any
    attributes: Dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> Optional[List[Optional[str]]]:
        """The ``names`` attribute as a list of strings, or None."""
        n = self.attributes.get("names")
        return list(n.values) if isinstance(n, RVector) and n.kind == "character" else None

    def named(self) -> Dict[str, Any]:
        """``{name: value}`` of a named vector or list (refused when it has no names)."""
        names = self.names
        if names is None:
            raise PrunekitError(f"R {self.kind} vector has no names attribute")
        return dict(zip(names, self.values))

    def __len__(self) -> int:
        return len(self.values)


@dataclass
class RPairList:
    """An R pairlist: ``items`` as (tag or None, value) pairs, plus its own ``attributes``."""
    items: List[Tuple[Optional[str], Any]]
    attributes: Dict[str, Any] = field(default_factory=dict)


class _Reader:
    def __init__(self, data: bytes, where: str) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.where = where
        self.refs: List[Any] = []
        self.native_encoding = "utf-8"

    # ------------------------------------------------------------------ primitives
    def fail(self, msg: str) -> PrunekitError:
        return PrunekitError(f"{self.where}: {msg} (at byte {self.pos})")

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> memoryview:
        if n < 0 or n > self.left():
            raise self.fail(f"truncated R data: need {n} bytes, {self.left()} left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self, item_bytes: int, what: str) -> int:
        """A vector length, checked against the bytes left (each element takes at least ``item_bytes``)."""
        n = self.int()
        if n == -1:  # a long vector: upper and lower 32 bits follow
            hi, lo = struct.unpack(">II", self.take(8))
            n = (hi << 32) | lo
        if n < 0:
            raise self.fail(f"negative length {n} for {what}")
        if n * item_bytes > self.left():
            raise self.fail(f"{what} of length {n} needs at least {n * item_bytes} bytes, {self.left()} left")
        return n

    # ------------------------------------------------------------------ items
    def header(self) -> None:
        fmt = bytes(self.take(2))
        if fmt != b"X\n":
            kinds = {b"A\n": "ASCII", b"B\n": "native binary", b"\x1f\x8b": "gzip-compressed"}
            raise self.fail(f"not an XDR R serialization (format {kinds.get(fmt, repr(fmt))}); only 'X\\n' is read")
        version = self.int()
        self.int()  # the writer's R version
        self.int()  # the oldest R version that reads it
        if version == 3:
            n = self.int()
            if n < 0 or n > 64:
                raise self.fail(f"bad native-encoding name length {n}")
            name = bytes(self.take(n)).decode("ascii", "replace")
            try:
                self.native_encoding = codecs.lookup(name).name
            except LookupError:
                raise self.fail(f"unknown native encoding {name!r}") from None
        elif version != 2:
            raise self.fail(f"R serialization version {version} (only 2 and 3 are read)")

    def item(self, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise self.fail(f"R object nested deeper than {MAX_DEPTH} levels")
        flags = self.int()
        t = flags & 0xFF
        has_attr = bool(flags & (1 << 9))
        if t == NILVALUE_SXP:
            return None
        if t == REFSXP:
            i = flags >> 8 or self.int()
            if not 1 <= i <= len(self.refs):
                raise self.fail(f"reference {i} to an object not read yet ({len(self.refs)} so far)")
            return self.refs[i - 1]
        if t in (EMPTYENV_SXP, BASEENV_SXP, GLOBALENV_SXP, BASENAMESPACE_SXP):
            return REnvironment({EMPTYENV_SXP: "empty", BASEENV_SXP: "base", GLOBALENV_SXP: "global",
                                 BASENAMESPACE_SXP: "base namespace"}[t])
        if t == SYMSXP:
            name = self.item(depth + 1)
            if not isinstance(name, str):
                raise self.fail("a symbol's name is not a string")
            sym = RSymbol(name)
            self.refs.append(sym)
            return sym
        if t == LISTSXP:
            return self.pairlist(flags, depth)
        if t == CHARSXP:
            return self.charsxp(flags)
        if t == ALTREP_SXP:
            return self.altrep(depth)
        if t in _VECTOR_KINDS:
            vec = RVector(_VECTOR_KINDS[t], self.vector(t, depth))
            if has_attr:
                vec.attributes = self.attributes(depth)
            return vec
        raise self.fail(f"unsupported R object type {_TYPE_NAMES.get(t, t)} (flags 0x{flags:08x})")

    def charsxp(self, flags: int) -> Optional[Union[str, bytes]]:
        n = self.int()
        if n == -1:
            return None  # NA_character_
        if n < 0:
            raise self.fail(f"negative string length {n}")
        raw = bytes(self.take(n))
        levels = flags >> 12
        if levels & _BYTES_MASK:
            return raw
        encoding = ("utf-8" if levels & _UTF8_MASK else "latin-1" if levels & _LATIN1_MASK
                    else "ascii" if levels & _ASCII_MASK else self.native_encoding)
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError as e:
            raise self.fail(f"string not valid {encoding}: {e}") from None

    def vector(self, t: int, depth: int) -> Any:
        if t in (LGLSXP, INTSXP):
            n = self.length(4, _TYPE_NAMES[t])
            ints = struct.unpack(f">{n}i", self.take(4 * n))
            if t == LGLSXP:
                return [None if v == _NA_INTEGER else bool(v) for v in ints]
            return [None if v == _NA_INTEGER else v for v in ints]
        if t == REALSXP:
            n = self.length(8, "REALSXP")
            return list(struct.unpack(f">{n}d", self.take(8 * n)))
        if t == CPLXSXP:
            n = self.length(16, "CPLXSXP")
            parts = struct.unpack(f">{2 * n}d", self.take(16 * n))
            return [complex(parts[2 * i], parts[2 * i + 1]) for i in range(n)]
        if t == RAWSXP:
            n = self.length(1, "RAWSXP")
            return bytes(self.take(n))
        if t == STRSXP:
            n = self.length(8, "STRSXP")  # each element: flags + length
            out = []
            for _ in range(n):
                flags = self.int()
                if flags & 0xFF != CHARSXP:
                    raise self.fail(f"a character vector holds a {_TYPE_NAMES.get(flags & 0xFF, flags & 0xFF)}")
                out.append(self.charsxp(flags))
            return out
        n = self.length(4, _TYPE_NAMES[t])  # VECSXP / EXPRSXP: each element at least a flags word
        return [self.item(depth + 1) for _ in range(n)]

    def pairlist(self, flags: int, depth: int) -> RPairList:
        """A LISTSXP chain, read iteratively along its CDRs (a long pairlist must not recurse)."""
        out = RPairList([])
        first = True
        while True:
            attrs = self.attributes(depth) if flags & (1 << 9) else {}
            if first:
                out.attributes, first = attrs, False
            tag = None
            if flags & (1 << 10):
                sym = self.item(depth + 1)
                if not isinstance(sym, RSymbol):
                    raise self.fail("a pairlist tag is not a symbol")
                tag = sym.name
            out.items.append((tag, self.item(depth + 1)))
            flags = self.int()
            t = flags & 0xFF
            if t == NILVALUE_SXP:
                return out
            if t != LISTSXP:
                raise self.fail(f"a pairlist ends in a {_TYPE_NAMES.get(t, t)}, not NULL")

    def attributes(self, depth: int) -> Dict[str, Any]:
        flags = self.int()
        if flags & 0xFF != LISTSXP:
            raise self.fail(f"attributes are a {_TYPE_NAMES.get(flags & 0xFF, flags & 0xFF)}, not a pairlist")
        plist = self.pairlist(flags, depth + 1)
        if any(tag is None for tag, _ in plist.items):
            raise self.fail("an attribute without a name")
        return {tag: value for tag, value in plist.items}

    def altrep(self, depth: int) -> RVector:
        """The ALTREP classes R writes for plain vectors: compact sequences and wrappers."""
        info = self.item(depth + 1)
        state = self.item(depth + 1)
        attr = self.item(depth + 1)
        cls = info.items[0][1] if isinstance(info, RPairList) and info.items else None
        name = cls.name if isinstance(cls, RSymbol) else None
        if name in ("compact_intseq", "compact_realseq") and isinstance(state, RVector) and len(state) == 3:
            n, start, step = state.values
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (n, start, step)) \
                    or not 0 <= n <= MAX_SEQUENCE:  # the few bytes of a sequence must not expand unboundedly
                raise self.fail(f"bad {name} state {state.values}")
            values: Any = [start + step * i for i in range(int(n))]
            vec = RVector("integer" if name == "compact_intseq" else "double",
                          [int(v) for v in values] if name == "compact_intseq" else [float(v) for v in values])
        elif name is not None and name.startswith("wrap_") and isinstance(state, RVector) and state.kind == "list" \
                and state.values and isinstance(state.values[0], RVector):
            inner = state.values[0]
            vec = RVector(inner.kind, inner.values, dict(inner.attributes))
        elif name == "deferred_string" and isinstance(state, RPairList) and state.items \
                and isinstance(state.items[0][1], RVector):
            arg = state.items[0][1]
            vec = RVector("character", [None if v is None else _r_number_string(v) for v in arg.values])
        else:
            raise self.fail(f"unsupported ALTREP class {name or info!r}")
        if isinstance(attr, RPairList):
            vec.attributes.update({tag: value for tag, value in attr.items if tag is not None})
        return vec


def _r_number_string(v: Any) -> str:
    if isinstance(v, bool):
        return "TRUE" if v else "FALSE"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def unserialize(data: bytes, where: str = "R data") -> Any:
    """The object of one uncompressed XDR serialization stream (``'X\\n'``, version 2 or 3).

    Trailing bytes are refused, so a stream cut or glued to another one is caught.
    """
    r = _Reader(bytes(data), where)
    r.header()
    obj = r.item()
    if r.left():
        raise r.fail(f"{r.left()} unexpected bytes after the object")
    return obj


def _inflate(payload: bytes, wbits: int, limit: int, where: str) -> bytes:
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(payload, limit + 1)
    except zlib.error as e:
        raise PrunekitError(f"{where}: bad compressed data ({e})") from None
    if len(out) > limit:
        raise PrunekitError(f"{where}: inflates past {limit} bytes")
    return out


def read_rds_bytes(data: bytes, where: str = "rds") -> Any:
    """An ``.rds`` file's object: gzip'd or plain XDR (bzip2 / xz ``.rds`` files are refused)."""
    if data[:2] == b"\x1f\x8b":
        data = _inflate(data, 16 + zlib.MAX_WBITS, MAX_INFLATED, where)
    elif data[:2] != b"X\n":
        raise PrunekitError(f"{where}: neither gzip'd nor plain XDR R data (starts {bytes(data[:4])!r})")
    return unserialize(data, where)


def _index_entries(index: Any, where: str) -> Tuple[Dict[str, Tuple[int, int]], int]:
    if not isinstance(index, RVector) or index.kind != "list" or index.names is None:
        raise PrunekitError(f"{where}: the index is not a named list")
    parts = index.named()
    variables, compressed = parts.get("variables"), parts.get("compressed")
    if not isinstance(variables, RVector) or variables.kind != "list":
        raise PrunekitError(f"{where}: the index has no 'variables' list")
    if variables.values and variables.names is None:
        raise PrunekitError(f"{where}: the index's variables have no names")
    entries: Dict[str, Tuple[int, int]] = {}
    for name, pos in zip(variables.names or [], variables.values):
        if not (isinstance(name, str) and isinstance(pos, RVector) and pos.kind in ("integer", "double")
                and len(pos) == 2 and all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0
                                          for v in pos.values)):
            raise PrunekitError(f"{where}: bad index entry for {name!r}")
        entries[name] = (int(pos.values[0]), int(pos.values[1]))
    method = 1
    if isinstance(compressed, RVector) and len(compressed) == 1 and compressed.values[0] is not None:
        method = int(compressed.values[0])
    return entries, method


def read_lazyload_db(rdx: Union[str, os.PathLike], rdb: Union[str, os.PathLike],
                     names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The objects of an R lazy-load database (``Rdata.rdx`` + ``Rdata.rdb``), all or only ``names``.

    Only zlib-compressed databases (R's default) are read; one with environments in its ``references``
    is read as long as the wanted objects do not refer to them.
    """
    rdx, rdb = Path(rdx), Path(rdb)
    entries, method = _index_entries(read_rds_bytes(rdx.read_bytes(), str(rdx)), str(rdx))
    if method != 1:
        raise PrunekitError(f"{rdx}: compression type {method} (only zlib, R's default, is read)")
    wanted = list(entries) if names is None else list(names)
    missing = [n for n in wanted if n not in entries]
    if missing:
        raise PrunekitError(f"{rdx}: no object(s) {', '.join(missing)}; has: {', '.join(entries)}")
    size = rdb.stat().st_size
    out: Dict[str, Any] = {}
    with open(rdb, "rb") as f:
        for name in wanted:
            offset, length = entries[name]
            where = f"{rdb}[{name}]"
            if length < 4 or offset + length > size:
                raise PrunekitError(f"{where}: record ({offset}, {length}) outside the {size}-byte file")
            f.seek(offset)
            record = f.read(length)
            declared = struct.unpack(">I", record[:4])[0]
            if declared > MAX_INFLATED:
                raise PrunekitError(f"{where}: declares {declared} bytes (more than {MAX_INFLATED})")
            data = _inflate(record[4:], zlib.MAX_WBITS, declared, where)
            if len(data) != declared:
                raise PrunekitError(f"{where}: inflates to {len(data)} bytes, declared {declared}")
            out[name] = unserialize(data, where)
    return out
