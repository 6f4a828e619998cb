"""Durable disk tier for KV blocks: a crash-safe, size-capped, opaque block store.

Entries (a dict of tensors plus a small JSON meta) are appended to segment files by a background thread, in
batches (one fsync and one index transaction per batch), so that ``put`` never stalls decode (its queue is
bounded: a full queue drops the put and counts it). A run of entries (``put_run``: the consecutive blocks of a
sequence) is one extent: one header, one checksum, one read, every entry still indexed under its own key (and
its slot in the extent); runs that follow each other in a batch are joined. So a restore (``read_batch``) is a
few large sequential reads, issued in parallel, with the extents' checks vectorised. An entry becomes visible
only after its bytes are durable and indexed; anything that fails a check on read is dropped and reported as a
miss. The quota counts the segment files and the index with its WAL; eviction drops whole segments, least
recently used first; a full disk evicts and retries. See docs/kv-store.md.

Layout under ``root``::

    LOCK                   flock'ed by the one process that owns the store (holds its pid)
    index.sqlite           WAL-mode index: namespace, key -> segment, offset, size, slot; last_access, created
    segments/<n>.seg       append-only segment files of extents, n = 16 hex digits, never reused
"""

from __future__ import annotations

import errno
import fcntl
import gc
import hashlib
import json
import logging
import os
import queue
import shutil
import sqlite3
import struct
import sys
import threading
import time
from array import array
from collections import OrderedDict
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import crc32c
import numpy
import torch
from numpy.lib.stride_tricks import sliding_window_view
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

log = logging.getLogger("flashport.kv.store")

__all__ = ["DiskKVStore", "KVStoreBusy", "chain_hashes", "FormatError", "FORMAT_VERSION", "MAGIC", "HEADER",
           "body_layout", "ReadBatch"]

# ----------------------------------------------------------------------------- format

FORMAT_VERSION = 3  # 1: one file per entry (data/xx/<h>.kv); 2: one record per entry in segments; 3: extents
MAGIC = b"FPKVBLK\x00"
# magic, version, flags, namespace_len, key_len, n_keys, tensors_len, meta_len, crc32c
HEADER = struct.Struct("<8sHHHHIQII")  # 36 bytes, little-endian
_CRC_OFFSET = HEADER.size - 4
INDEX_SCHEMA = 3  # PRAGMA user_version of index.sqlite (1: one file per entry; 2: one record per entry)
SEGMENT_MAX = 256 << 20  # a segment is sealed past this (or past capacity / 16, whichever is smaller)
EXTENT_MAX = 4 << 20     # the writer cuts runs into extents of at most about this many bytes (one entry at least)
EXTENT_GAP = 256 << 10   # extents of one read closer than this are fetched in one read (the gap is read too)
READ_PIECE = 1 << 20     # reads are cut (at extent boundaries) into pieces of about this size, read in parallel
READ_THREADS = 8
ALIGN = 64  # an extent's payload starts, and the extent ends, at a multiple of this from the extent's start


def _aligned(n):
    """n rounded up to a multiple of ALIGN (ints or int64 arrays)."""
    return (n + ALIGN - 1) // ALIGN * ALIGN


class FormatError(ValueError):
    """A record failed a check (truncated, bad magic/version/checksum, wrong key)."""


class KVStoreBusy(ValueError):
    """Another store holds the directory (the flock on its LOCK file), raised when the store opens: two processes
    on one directory would delete each other's files in recovery. The message names the directory and the
    holder's pid when known; the CLI prints it as ``flashport: error: KV directory D is in use by ...``."""


def check_not_in_use(root: str | Path) -> None:
    """Raise KVStoreBusy when another process holds the store at `root` (its LOCK flock): what opening the store
    would refuse, checked before a model is loaded. A directory without a store passes."""
    lock = Path(root) / "LOCK"
    if not lock.is_file():
        return
    with open(lock, "rb") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = f.read(32).decode("ascii", "replace").strip()
            who = f"another process (pid {holder})" if holder.isdigit() else "another process"
            raise KVStoreBusy(f"KV directory {root} is in use by {who}") from None
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _encode(namespace: bytes, keys: list[bytes], tensors: dict, meta_json: bytes) -> list[bytes]:
    """Serialize one extent (the entries of `keys`, all of one length) into chunks (no concatenation: avoids
    copying the payload)."""
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    body = _st_save(cpu)
    # zero padding: the payload at a multiple of ALIGN (safetensors aligns each tensor to 8 within it, so every
    # tensor of an extent read into an aligned buffer can be viewed in place), the extent a multiple of ALIGN
    key_part = b"".join(keys)
    lead = HEADER.size + len(namespace) + len(key_part)
    pad1 = bytes(_aligned(lead) - lead)
    tail = _aligned(lead) + len(body) + len(meta_json)
    pad2 = bytes(_aligned(tail) - tail)
    head = HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(namespace), len(keys[0]), len(keys), len(body),
                       len(meta_json), 0)
    crc = 0
    for part in (head[:_CRC_OFFSET], namespace, key_part, pad1, body, meta_json, pad2):
        crc = crc32c.crc32c(part, crc)
    return [head[:_CRC_OFFSET] + struct.pack("<I", crc), namespace, key_part, pad1, body, meta_json, pad2]


_MAGIC = numpy.frombuffer(MAGIC, numpy.uint8)
# the checks of an extent, in the order they are reported (the first that fails names the error); the last is
# per entry: the key at the entry's slot must be the key asked for
_CHECKS = ("truncated record", "bad magic", "unsupported format version", "size mismatch", "checksum mismatch",
           "namespace mismatch", "key mismatch")


@contextmanager
def _gc_paused():
    """No cyclic garbage collection inside (bulk work that allocates many small acyclic objects: each collection
    would walk the whole heap); restored on exit unless it was off already (or another thread turned it off)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _rows(buf: numpy.ndarray, at: numpy.ndarray, length: int) -> numpy.ndarray:
    """[len(at), length] uint8: buf[a:a + length] for every a in `at`, in one copy (no index array per byte)."""
    if length == 0 or not len(at) or len(buf) < length:  # the last: only records too short to check at all
        return numpy.zeros((len(at), length), numpy.uint8)
    return sliding_window_view(buf, length)[at]


class ReadBatch:
    """Entries read by `DiskKVStore.read_batch`: one buffer holding every extent read and, per requested key, its
    extent and its slot in it (`ext[i] == -1` for a miss); per extent, where its tensor payload (a safetensors
    buffer) and its meta (JSON) lie in the buffer and how many entries it holds. Entry `slot` of an extent of n
    entries is rows slot * r .. (slot + 1) * r - 1 of each of its tensors (r = rows / n). There is no object per
    entry: `part` copies one tensor's rows of many entries with one copy per run of them in one extent."""

    def __init__(self, n: int):
        self.buf = numpy.empty(0, numpy.uint8)
        self.ext = numpy.full(n, -1, numpy.int64)        # per key: its extent (index into the x_* arrays), -1: miss
        self.slot = numpy.zeros(n, numpy.int64)          # per key: its entry's place in the extent
        self.x_body = numpy.zeros(0, numpy.int64)        # per extent: offset of its payload in buf, -1 if it failed
        self.x_body_len = numpy.zeros(0, numpy.int64)
        self.x_meta_len = numpy.zeros(0, numpy.int64)    # the meta follows the payload
        self.x_entries = numpy.zeros(0, numpy.int64)     # entries in the extent
        self._layouts: dict[int, dict] = {}
        self.checked: set[int] = set()  # extents a reader has checked (for its own use)

    @property
    def found(self) -> numpy.ndarray:
        """bool [n]: the entries that were read and passed every check."""
        return self.ext >= 0

    def extent(self, i: int) -> int:
        return int(self.ext[i])

    def payload(self, i: int) -> memoryview:
        """The tensor payload (safetensors bytes) of entry i's whole extent."""
        x = int(self.ext[i])
        a = int(self.x_body[x])
        return memoryview(self.buf)[a:a + int(self.x_body_len[x])]

    def meta_bytes(self, i: int) -> bytes:
        """The meta of entry i's extent (one meta per extent: `DiskKVStore.put_run`)."""
        x = int(self.ext[i])
        a = int(self.x_body[x] + self.x_body_len[x])
        return self.buf[a:a + int(self.x_meta_len[x])].tobytes()

    def meta(self, i: int) -> dict:
        """Entry i's (extent's) meta, decoded; FormatError when it is not a JSON object."""
        try:
            meta = json.loads(self.meta_bytes(i))
        except ValueError as e:
            raise FormatError(f"undecodable meta: {e}") from e
        if not isinstance(meta, dict):
            raise FormatError("meta is not an object")
        return meta

    def entry_layout(self, i: int) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
        """name -> (dtype, shape of one entry's rows, start, end of the whole tensor in the payload) for entry i's
        extent (the safetensors header parsed once per distinct header). FormatError if it is malformed or a
        tensor's rows do not split evenly among the extent's entries."""
        x = int(self.ext[i])
        got = self._layouts.get(x)
        if got is None:
            n, got = int(self.x_entries[x]), {}
            for name, (dtype, shape, lo, hi) in body_layout(self.payload(i)).items():
                if not shape or shape[0] % n:
                    raise FormatError(f"tensor {name} of {shape} rows does not split into {n} entries")
                got[name] = (dtype, (shape[0] // n, *shape[1:]), lo, hi)
            self._layouts[x] = got
        return got

    def entry(self, i: int) -> dict[str, torch.Tensor]:
        """Entry i's tensors, decoded (copies: they do not hold the batch's buffer)."""
        x, s = int(self.ext[i]), int(self.slot[i])
        out = {}
        for name, (dtype, shape, lo, hi) in self.entry_layout(i).items():
            per = (hi - lo) // int(self.x_entries[x])
            a = int(self.x_body[x]) + lo + s * per
            out[name] = torch.from_numpy(self.buf[a:a + per].copy()).view(dtype).reshape(shape)
        return out

    def spans(self, idx) -> list[tuple[int, int, int, int]]:
        """Runs of entries idx (found ones) lying at consecutive slots of one extent -> [(a, b, extent, first
        slot)]: idx[a:b] are slots first .. first + b - a - 1 of that extent. The blocks of a prompt written
        together are a few spans."""
        idx = numpy.asarray(idx, dtype=numpy.int64)
        ext, slot = self.ext[idx], self.slot[idx]
        brk = numpy.ones(len(idx), bool)
        brk[1:] = (ext[1:] != ext[:-1]) | (slot[1:] != slot[:-1] + 1)
        starts = numpy.flatnonzero(brk).tolist()
        return [(a, b, int(ext[a]), int(slot[a])) for a, b in zip(starts, starts[1:] + [len(idx)])]

    def rows(self, i: int, count: int, name: str) -> torch.Tensor:
        """Tensor `name` of entries i .. i + count - 1 of entry i's extent (consecutive slots: a `spans` run) as one
        tensor [count * rows, ...], a view into the batch's buffer (no copy: valid while the batch lives).
        FormatError if the extent lacks `name` or holds fewer entries."""
        x, s = int(self.ext[i]), int(self.slot[i])
        lay = self.entry_layout(i).get(name)
        if lay is None or s + count > int(self.x_entries[x]):
            raise FormatError(f"no tensor {name} for {count} entries")
        dtype, shape, lo, hi = lay
        per = (hi - lo) // int(self.x_entries[x])
        a = int(self.x_body[x]) + lo + s * per
        return torch.from_numpy(self.buf[a:a + count * per]).view(dtype).reshape(count * shape[0], *shape[1:])

    def part(self, idx, name: str, out: numpy.ndarray | None = None) -> numpy.ndarray:
        """uint8 [len(idx), bytes of one entry's rows of tensor `name`]: that tensor's rows of entries idx (found
        ones), in order, one copy per run of them lying in one extent at consecutive slots (the blocks of one
        prompt, written together). Into `out` if given (a uint8 array of that shape, e.g. a tensor's bytes).
        FormatError if an extent lacks `name` or holds it at another size per entry."""
        idx = numpy.asarray(idx, dtype=numpy.int64)
        ext, slot = self.ext[idx], self.slot[idx]
        brk = numpy.ones(len(idx), bool)
        brk[1:] = (ext[1:] != ext[:-1]) | (slot[1:] != slot[:-1] + 1)
        starts = numpy.flatnonzero(brk).tolist() + [len(idx)]
        per = None
        for a, b in zip(starts, starts[1:]):
            lay = self.entry_layout(int(idx[a])).get(name)
            if lay is None:
                raise FormatError(f"no tensor {name}")
            x = int(ext[a])
            p = (lay[3] - lay[2]) // int(self.x_entries[x])
            if per is None:
                per = p
                if out is None:
                    out = numpy.empty((len(idx), per), numpy.uint8)
                elif out.shape != (len(idx), per):
                    raise FormatError(f"tensor {name}: {per} bytes per entry, not {out.shape[1:]}")
            elif p != per:
                raise FormatError(f"tensor {name}: {p} bytes per entry in one extent, {per} in another")
            src = int(self.x_body[x]) + lay[2] + int(slot[a]) * p
            out[a:b].reshape(-1)[:] = self.buf[src:src + (b - a) * p]
        if out is None:
            out = numpy.empty((0, 0), numpy.uint8)
        return out


def _verify_extents(buf: numpy.ndarray, pos: numpy.ndarray, size: numpy.ndarray, namespace: bytes) -> numpy.ndarray:
    """Check extents of buf as one vectorised pass: extent j lies at pos[j] (size[j] bytes, as indexed). Checks
    length, magic, version, sizes, CRC32C (one call per extent: the only per-extent Python) and namespace ->
    (int64 [n]: per extent the index into _CHECKS of the first failed check, len(_CHECKS) - 1 when all pass (the
    key check is per entry: `_check_keys`); int64 [5, n]: the header's namespace, key and payload lengths, entry
    count and meta length, NL, KL, NK, TL, ML)."""
    n = len(pos)
    passed = len(_CHECKS) - 1
    fail = numpy.full(n, passed, numpy.int64)

    def failing(code: int, bad: numpy.ndarray) -> None:
        numpy.minimum(fail, numpy.where(bad, code, passed), out=fail)

    whole = size >= HEADER.size
    failing(0, ~whole)
    h = _rows(buf, numpy.where(whole, pos, 0), HEADER.size)  # [n, 36]: the fields of HEADER, little-endian

    def field(a: int, b: int, dtype: str) -> numpy.ndarray:
        return numpy.ascontiguousarray(h[:, a:b]).view(dtype)[:, 0]

    failing(1, (h[:, :8] != _MAGIC).any(1))
    failing(2, field(8, 10, "<u2") != FORMAT_VERSION)
    nl, kl, nk = (field(a, b, t).astype(numpy.int64) for a, b, t in ((12, 14, "<u2"), (14, 16, "<u2"), (16, 20, "<u4")))
    tl = numpy.minimum(field(20, 28, "<u8"), numpy.uint64(1 << 62)).astype(numpy.int64)  # a huge one fails, no wrap
    ml = field(28, 32, "<u4").astype(numpy.int64)
    failing(3, (nk == 0) | (_aligned(_aligned(HEADER.size + nl + nk * kl) + tl + ml) != size))
    sized = fail > 3
    crc = numpy.zeros(n, numpy.uint32)
    mv = memoryview(buf)
    rows = numpy.flatnonzero(sized)
    crc[rows] = [crc32c.crc32c(mv[a + HEADER.size:a + s], crc32c.crc32c(mv[a:a + _CRC_OFFSET]))
                 for a, s in zip(pos[rows].tolist(), size[rows].tolist())]
    failing(4, sized & (crc != field(32, 36, "<u4")))
    ns = numpy.frombuffer(namespace, numpy.uint8)
    ns_ok = sized & (nl == len(ns))
    good_ns = numpy.zeros(n, bool)
    good_ns[ns_ok] = (_rows(buf, pos[ns_ok] + HEADER.size, len(ns)) == ns).all(1)
    failing(5, sized & ~good_ns)
    return fail, numpy.stack([nl, kl, nk, tl, ml])


def _check_keys(buf: numpy.ndarray, at: numpy.ndarray, key_len: numpy.ndarray, want: list) -> numpy.ndarray:
    """bool [n]: whether the stored key of entry j (key_len[j] bytes at buf[at[j]:]) is want[j]; keys of one
    length are compared at once."""
    n = len(at)
    want_len = numpy.fromiter(map(len, want), numpy.int64, n)
    good = numpy.zeros(n, bool)
    for L in sorted(set(want_len.tolist())):
        sel = numpy.flatnonzero((want_len == L) & (key_len == L))
        if len(sel):
            joined = b"".join(want) if len(sel) == n else b"".join([want[j] for j in sel.tolist()])
            exp = numpy.frombuffer(joined, numpy.uint8).reshape(len(sel), L)
            good[sel] = (_rows(buf, at[sel], L) == exp).all(1)
    return good


def _decode_body(body) -> dict[str, torch.Tensor]:
    try:
        return _st_load(bytes(body))
    except Exception as e:  # noqa: BLE001 - checksum passed, so a writer bug: never served
        raise FormatError(f"undecodable payload: {e}") from e


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_layouts: dict[bytes, dict] = {}
_layouts_lock = threading.Lock()


def body_layout(body) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """Where each tensor of an entry's payload (a safetensors buffer: `read_many`, `ReadBatch.payload`) lies:
    name -> (dtype, shape, start, end), byte offsets into `body`. The safetensors header is parsed once per
    distinct header (every block of a model has the same one), so a caller can gather the bytes of thousands of
    entries without making a tensor per entry. Raises FormatError on a malformed header.
    Format: https://github.com/huggingface/safetensors (8-byte LE header length, JSON header, data)."""
    if len(body) < 8:
        raise FormatError("payload too short")
    (hl,) = struct.unpack_from("<Q", body)
    if 8 + hl > len(body):
        raise FormatError("payload header overruns the payload")
    head = bytes(body[8:8 + hl])
    got = _layouts.get(head)
    if got is None:
        got = _parse_layout(head, 8 + hl)
    if len(body) != got[0]:
        raise FormatError("payload length does not match its header")
    return got[1]


def _parse_layout(head: bytes, base: int) -> tuple[int, dict]:
    try:
        spec = json.loads(head)
        out, end = {}, base
        for name, d in spec.items():
            if name == "__metadata__":
                continue
            dtype, shape = _ST_DTYPES[d["dtype"]], tuple(int(s) for s in d["shape"])
            lo, hi = (int(x) for x in d["data_offsets"])
            n = 1
            for s in shape:
                n *= s
            if not 0 <= lo <= hi or hi - lo != n * dtype.itemsize:
                raise ValueError(f"bad offsets of {name}")
            out[name] = (dtype, shape, base + lo, base + hi)
            end = max(end, base + hi)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise FormatError(f"undecodable payload header: {e}") from e
    with _layouts_lock:
        if len(_layouts) > 1024:  # a bound, not a cache policy: layouts are few
            _layouts.clear()
        _layouts[head] = (end, out)
    return end, out


def _seg_name(seg: int) -> str:
    return f"{seg:016x}.seg"


def _key_bytes(key: bytes | str) -> bytes:
    if isinstance(key, str):
        return key.encode("utf-8")
    if isinstance(key, (bytes, bytearray, memoryview)):
        return bytes(key)
    raise TypeError(f"key must be bytes or str, not {type(key).__name__}")


def chain_hashes(token_ids: list[int], block_tokens: int, namespace: str, prev: bytes | None = None) -> list[bytes]:
    """Chained 32-byte block hashes: h_i = H(h_{i-1} || namespace || tokens of block i).

    Only complete blocks are hashed. Equal prefixes give equal hash prefixes, and a hash
    names the whole prefix up to its block (not just the block), so it can key the store.
    ``prev`` continues a chain: pass the last hash of the blocks before ``token_ids``
    (a growing sequence hashes only its new blocks).
    """
    if block_tokens <= 0:
        raise ValueError("block_tokens must be positive")
    ns = namespace.encode("utf-8")
    ns_part = struct.pack("<II", len(ns), block_tokens) + ns
    prev, out = (b"\x00" * 32 if prev is None else prev), []
    n = len(token_ids) // block_tokens * block_tokens
    # int64, one conversion for every block (none for an int64 array: SeqTracker keeps its tokens in one)
    toks = token_ids[:n] if isinstance(token_ids, array) and token_ids.typecode == "q" else array("q", token_ids[:n])
    if sys.byteorder != "little":
        toks.byteswap()
    data, step = bytes(memoryview(toks).cast("B")), 8 * block_tokens
    blake2b, join = hashlib.blake2b, b"".join
    for start in range(0, 8 * n, step):  # one call per block: the same digest as updating with the three parts
        prev = blake2b(join((prev, ns_part, data[start:start + step])), digest_size=32,
                       person=b"flashport-kv-v1").digest()
        out.append(prev)
    return out


# ----------------------------------------------------------------------------- file I/O


def _write_all(fd: int, buf: bytes) -> None:
    mv = memoryview(buf)
    while mv:
        n = os.write(fd, mv)
        if n <= 0:  # never loop forever on a device that accepts nothing
            raise OSError(errno.ENOSPC, "short write")
        mv = mv[n:]


def _read_into(fd: int, buf: memoryview, offset: int) -> None:
    """Fill buf from fd at offset (positional reads, safe from several threads); FormatError if the file ends."""
    while buf:
        n = os.preadv(fd, [buf], offset)
        if n <= 0:
            raise FormatError("truncated segment")
        buf, offset = buf[n:], offset + n


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quiet(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("kvstore: cannot remove %s: %s", path, e)


# ----------------------------------------------------------------------------- store


@dataclass(slots=True)  # one per stored block: a million-token prefix holds tens of thousands
class _Entry:
    seg: int      # segment number
    offset: int   # byte offset of the entry's extent in its segment
    size: int     # extent bytes
    slot: int     # the entry's place in its extent
    last_access: float
    created: float


@dataclass
class _Segment:
    size: int = 0                                   # bytes in the file (live records, dead records)
    live: set = field(default_factory=set)          # idents of the indexed records in it
    last_access: float = 0.0                        # the most recent access of any of them
    fd: int | None = None                           # open for appending (the active segment only)


_COUNTERS = (
    "hits", "misses", "bytes_written", "bytes_read", "puts_dropped", "write_errors",
    "read_errors", "evictions", "corrupt_dropped", "discarded", "disk_full_evictions", "read_seconds",
    "write_seconds", "segments_evicted",
)
INDEX_FILES = ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm")
INDEX_SLACK = 64 << 10  # what the two commits of a batch (evict, insert) may add to the WAL after the quota check
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
WRITER_NICE = 10  # the writer thread's nice value (added to the process's): the disk can wait, decode cannot
BATCH_MAX_BYTES = 64 << 20  # one writer batch (one fsync, one index transaction) takes at most this many bytes


class DiskKVStore:
    """Opaque, durable, size-capped key -> (tensors, meta) store; see module docstring.

    Thread model: ``get``/``read_batch``/``read_many``/``contains``/``put`` may be called from any thread (the engine);
    segment writes happen on one background thread (or inline for ``put(sync=True)``).
    Locks: ``_lock`` guards the in-memory index, the segments and counters and is only held for dict
    operations, so a read never waits for an fsync; ``_write_lock`` serializes everything that appends to,
    creates or deletes segment files; ``_db_lock`` guards the SQLite connection.
    """

    #: consecutive write failures after which puts are refused for ``error_backoff_s``
    max_errors_in_row = 8
    error_backoff_s = 30.0

    def __init__(self, root: str | Path, capacity_bytes: int, namespace: str,
                 queue_size: int = 64, fsync: bool = True, segment_bytes: int | None = None):
        """capacity_bytes: the quota for segment files plus index.sqlite and its WAL. segment_bytes: a segment is
        sealed past this size (default: capacity / 16, at most SEGMENT_MAX; eviction drops whole segments, so a
        segment must be a small share of the quota). Raises KVStoreBusy when another store (process) holds
        ``root``; any other unusable root gives a degraded store."""
        self.root = Path(root)
        self.capacity = int(capacity_bytes)
        # the WAL is checkpointed (truncated) when the index files pass this: it is counted in the quota
        self._index_budget = max(self.capacity // 8, 64 << 10)
        # small segments under a small quota: eviction drops whole segments, so one must be a small share of it
        self.segment_max = max(1, segment_bytes or min(SEGMENT_MAX, self.capacity // 16))
        self.namespace = namespace
        self._ns = namespace.encode("utf-8")
        if len(self._ns) > 0xFFFF:
            raise ValueError("namespace too long")
        self._fsync = fsync
        self._dir = self.root / "segments"
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._db_lock = threading.Lock()
        self._drained = threading.Condition()
        self._index: OrderedDict[tuple[str, bytes], _Entry] = OrderedDict()  # LRU first
        self._segs: OrderedDict[int, _Segment] = OrderedDict()  # LRU first (by their most recent access)
        self._active: int | None = None  # the segment being appended to
        self._sealed: set[int] = set()  # segments no longer appended to whose fd closes after their batch's sync
        self._new_segment = False  # a segment file was created since the last directory fsync
        self._next_seg = 1
        self._touched: dict[tuple[str, bytes], float] = {}  # last_access not yet in SQLite
        self._queued: set[bytes] = set()
        self._pending = 0  # puts accepted but not yet processed
        self._used = 0  # bytes of the segment files + the reservation of the batch in flight
        self._stats = dict.fromkeys(_COUNTERS, 0)
        self._logged: set[str] = set()
        self._errors_in_row = 0
        self._refuse_until = 0.0
        self._closed = self._closing = False
        self._degraded: str | None = None
        self._db: sqlite3.Connection | None = None
        self._lock_file = None
        self._q: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        try:
            self._open()
        except (OSError, sqlite3.Error) as e:
            # An unusable root (read-only, missing permissions, owned by another process)
            # disables the tier instead of failing the engine: every put/get is a miss.
            self._degraded = f"{type(e).__name__}: {e}"
            log.error("kvstore: disk tier at %s disabled: %s", self.root, self._degraded)
            self._release_files()
        self._thread = threading.Thread(target=self._writer_loop, name="flashport-kvstore", daemon=True)
        if self._degraded is None:
            self._thread.start()

    # ------------------------------------------------------------------ open / recover

    def _open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.root / "LOCK", "a+b")
        # Recovery deletes files it does not know; two processes on one root would
        # delete each other's work, so the second one is refused, once, at open.
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.seek(0)
            holder = self._lock_file.read(32).decode("ascii", "replace").strip()
            self._release_files()
            who = (f"this process (pid {holder})" if holder == str(os.getpid()) else
                   f"another process (pid {holder})" if holder.isdigit() else "another process")
            raise KVStoreBusy(f"KV directory {self.root} is in use by {who}") from None
        self._lock_file.truncate(0)  # append mode: the pid lands at offset 0
        self._lock_file.write(f"{os.getpid()}\n".encode())
        self._lock_file.flush()
        try:
            self._db = self._open_db()
        except sqlite3.DatabaseError as e:
            # A corrupt index: start over. Its segments become orphans and are deleted below.
            log.warning("kvstore: index unreadable (%s); starting with an empty store", e)
            for suffix in ("", "-wal", "-shm"):
                _unlink_quiet(self.root / f"index.sqlite{suffix}")
            self._db = self._open_db()
        self._dir.mkdir(exist_ok=True)
        self._recover()
        self._checkpoint_if_large()
        if self._fsync:
            _fsync_dir(self._dir)
            _fsync_dir(self.root)

    def _open_db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.root / "index.sqlite", check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL survives process crashes; after power loss the last commits may
            # roll back, which recovery turns into unindexed tails (truncated) or rows past
            # their segment's end (dropped): never into a wrong entry.
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA journal_size_limit={self._index_budget // 2}")  # WAL size after a checkpoint
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, INDEX_SCHEMA):
                # another format (1: one file per entry under data/, 2: one record per entry): a cache may
                # forget, never misread. Its segments are named by no row now: recovery deletes them.
                log.warning("kvstore: %s holds a KV store of format %d; starting empty in format %d",
                            self.root, version, INDEX_SCHEMA)
                db.execute("DROP TABLE IF EXISTS entries")
                shutil.rmtree(self.root / "data", ignore_errors=True)
            db.execute(
                "CREATE TABLE IF NOT EXISTS entries (namespace TEXT NOT NULL, key BLOB NOT NULL,"
                " segment INTEGER NOT NULL, offset INTEGER NOT NULL, size INTEGER NOT NULL, slot INTEGER NOT NULL,"
                " last_access REAL NOT NULL, created REAL NOT NULL, PRIMARY KEY (namespace, key))"
            )
            db.execute(f"PRAGMA user_version={INDEX_SCHEMA}")
            return db
        except BaseException:
            db.close()
            raise

    def _recover(self) -> None:
        """Make index and segments agree: rows name only complete records, segments hold only indexed bytes at
        their end, and no segment without rows remains."""
        on_disk: dict[int, int] = {}
        for f in self._dir.iterdir():
            try:
                seg = int(f.name.removesuffix(".seg"), 16) if f.name.endswith(".seg") else None
            except ValueError:
                seg = None
            if seg is None or not f.is_file():
                _unlink_quiet(f)  # not ours (or a leftover of a newer writer): a cache may forget
                continue
            on_disk[seg] = f.stat().st_size
        rows = self._db.execute("SELECT namespace, key, segment, offset, size, slot, last_access, created"
                                " FROM entries ORDER BY last_access").fetchall()
        stale, ends = [], {}
        for ns, key, seg, off, size, slot, last_access, created in rows:
            if seg not in on_disk or off < 0 or size <= 0 or slot < 0 or off + size > on_disk[seg]:
                stale.append((ns, key))  # its bytes never reached the disk, or the segment is gone
                continue
            ident = (ns, bytes(key))
            self._index[ident] = _Entry(seg, off, size, slot, last_access, created)
            s = self._segs.setdefault(seg, _Segment())
            s.live.add(ident)
            s.last_access = max(s.last_access, last_access)
            ends[seg] = max(ends.get(seg, 0), off + size)
        if stale:
            self._db.executemany("DELETE FROM entries WHERE namespace=? AND key=?", stale)
        orphans = truncated = 0
        for seg, size in on_disk.items():
            path = self._dir / _seg_name(seg)
            if seg not in self._segs:  # no row names it: a crash between a batch's append and its insert
                _unlink_quiet(path)
                orphans += 1
                continue
            if size > ends[seg]:  # an unindexed tail: the last batch crashed before its index insert
                os.truncate(path, ends[seg])
                truncated += 1
            self._segs[seg].size = ends[seg]
            self._used += ends[seg]
        self._segs = OrderedDict(sorted(self._segs.items(), key=lambda kv: kv[1].last_access))
        self._next_seg = max(on_disk, default=0) + 1
        if stale or orphans or truncated:
            log.info("kvstore: recovery dropped %d stale index rows and %d orphan segments, truncated %d segments",
                     len(stale), orphans, truncated)
        if self._used > self._entry_limit():  # the cap was lowered since the last run
            self.evict_to(self._entry_limit())

    # ------------------------------------------------------------------ public API

    def put(self, key: bytes | str, tensors: dict[str, torch.Tensor], meta: dict | None = None,
            sync: bool = False) -> bool:
        """Store an entry. Async (default): enqueue and return at once; False if the queue is
        full or the tier is disabled. ``sync=True``: write inline, return whether it is stored.

        The tensors are referenced, not copied: do not modify them after ``put``.
        Keys are content addresses: re-putting a stored or queued key is a no-op.
        """
        return self.put_run([key], tensors, meta, sync)

    def put_run(self, keys: list, tensors: dict[str, torch.Tensor], meta: dict | None = None, sync: bool = False,
                follows: bytes | str | None = None) -> bool:
        """Store a run of n entries in one extent (one header, one checksum, one read): entry i is rows
        i * r .. (i + 1) * r - 1 of every tensor (each tensor has n * r rows), all of them under one `meta`; a get
        of key i returns entry i's rows and that meta. The keys must be of one length (block hashes).

        follows: the last key of the run this one continues (the blocks before it of the same sequence): the writer
        joins runs that follow each other in one batch, with the same meta and the same rows per entry, into one
        extent (cut at about EXTENT_MAX bytes), so a sequence stored a few blocks at a time still reads back as a
        few large extents. Returns as `put` (one queue slot for the whole run; already stored keys are not
        written again, the others are). Raises TypeError / ValueError on malformed input.
        """
        ks = [_key_bytes(k) for k in keys]
        if not ks or len({len(k) for k in ks}) != 1 or len(ks[0]) > 0xFFFF:
            raise ValueError("a run needs one key at least, all of one length (< 64 KiB)")
        if not all(isinstance(n, str) and isinstance(t, torch.Tensor) for n, t in tensors.items()):
            raise TypeError("tensors must be a dict[str, torch.Tensor]")
        if len(ks) > 1 and any(t.dim() == 0 or t.shape[0] % len(ks) for t in tensors.values()):
            raise ValueError(f"every tensor of a run of {len(ks)} entries needs a multiple of {len(ks)} rows")
        meta_json = json.dumps(meta or {}, separators=(",", ":")).encode("utf-8")  # TypeError early
        item = (tuple(ks), dict(tensors), meta_json, None if follows is None else _key_bytes(follows))
        if not self._accepting():
            self._count("puts_dropped")
            return False
        if sync:
            return self._store_batch([item]) == len(ks)
        with self._lock:
            new = [k for k in ks if (self.namespace, k) not in self._index and k not in self._queued]
            if not new:
                return True
            self._queued.update(new)
        with self._drained:
            self._pending += 1
        try:
            self._q.put_nowait(item)
            return True
        except queue.Full:
            with self._lock:
                self._queued.difference_update(new)
            self._done_one()
            self._count("puts_dropped")
            self._log_once("queue_full", logging.WARNING, "write queue full; dropping puts (counted in puts_dropped)")
            return False

    def get(self, key: bytes | str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """Return (tensors, meta) or None. Any failed check drops the entry and returns None."""
        return self.get_many([key])[0]

    def get_many(self, keys: list) -> list[tuple[dict[str, torch.Tensor], dict] | None]:
        """`get` for many keys, read in one `read_batch`; an entry whose payload or meta does not decode is dropped
        (a miss)."""
        batch = self.read_batch(keys)
        out: list = [None] * len(keys)
        for i in numpy.flatnonzero(batch.found).tolist():
            try:
                out[i] = (batch.entry(i), batch.meta(i))
            except FormatError as err:  # the checksum passed, so a writer bug: never served
                self._corrupt((self.namespace, _key_bytes(keys[i])), err)
                self._count("hits", -1)
                self._count("misses")
        return out

    def read_batch(self, keys: list, consume=None) -> "ReadBatch":
        """The restore path: read and verify many entries with a few large reads and no Python work per entry
        beyond its index lookup -> a ReadBatch (one buffer; per key its extent and slot, -1 for a miss).

        The extents holding the entries are read once each, sorted by (segment, offset); extents closer than
        EXTENT_GAP form one read (the gap is read too), cut at extent boundaries into pieces of about READ_PIECE
        bytes; each piece is read (positional reads, GIL released) and then verified by one of READ_THREADS
        threads, so the checks of one piece overlap the reads of the next. The checks are those of every read:
        per extent length, magic, version, sizes, CRC32C and namespace (vectorised over the extents of a piece,
        one CRC32C call per extent), per entry the key at its slot; an entry that fails one is dropped and is a
        miss, the others are served. The meta is not decoded here (`ReadBatch.meta`). A read refreshes the
        recency of the segments it read (eviction drops whole segments).

        consume(batch, idx): called on the reading thread as soon as a piece is verified, with idx (int64) the
        positions in `keys` of the entries it served, so that the caller's work on them (unpacking) overlaps
        the reads of the other pieces; calls come from several threads at once, in no order. An exception it
        raises is raised by read_batch once every piece is done."""
        with _gc_paused():  # tens of thousands of small objects: no collector passes over the heap meanwhile
            return self._read_batch(keys, consume)

    def _read_batch(self, keys: list, consume=None) -> "ReadBatch":
        ns = self.namespace
        idents = [(ns, k if type(k) is bytes else _key_bytes(k)) for k in keys]
        batch = ReadBatch(len(keys))
        with self._lock:
            live = None if self._closed or self._degraded else self._index
            got = list(map(live.get, idents)) if live is not None else []
        hit = [i for i, e in enumerate(got) if e is not None]
        self._count("misses", len(keys) - len(hit))
        if not hit:
            return batch
        t0 = time.perf_counter()
        ents = [got[i] for i in hit]
        table = numpy.array([(e.seg, e.offset, e.size, e.slot) for e in ents], dtype=numpy.int64).reshape(-1, 4)
        # the extents: one per distinct (segment, offset), sorted; key_x: each hit's extent
        where, key_x = numpy.unique(table[:, 0] << 40 | table[:, 1], return_inverse=True)  # offsets < 1 TiB
        key_x = key_x.reshape(-1)
        n_x = len(where)
        seg, off = where >> 40, where & ((1 << 40) - 1)
        size = numpy.zeros(n_x, numpy.int64)
        size[key_x] = table[:, 2]
        end = off + size
        slot = table[:, 3]
        hit_a = numpy.asarray(hit, dtype=numpy.int64)
        by_x = numpy.argsort(key_x, kind="stable")  # the hits grouped by extent: a piece's are one slice of it
        x_sorted = key_x[by_x]
        # a new read where the segment changes, extents overlap (never, for indexed ones) or a gap is large
        new = numpy.ones(n_x, bool)
        new[1:] = (seg[1:] != seg[:-1]) | (off[1:] < end[:-1]) | (off[1:] > end[:-1] + EXTENT_GAP)
        ext_start = off[numpy.maximum.accumulate(numpy.where(new, numpy.arange(n_x), 0))]
        piece_no = (off - ext_start) // READ_PIECE
        new[1:] |= piece_no[1:] != piece_no[:-1]
        starts = numpy.flatnonzero(new).tolist() + [n_x]
        pieces = [(int(seg[a]), int(off[a]), int(end[b - 1] - off[a]), a, b) for a, b in zip(starts, starts[1:])]
        fds: dict[int, int | BaseException] = {}
        for s in set(p[0] for p in pieces):
            try:
                fds[s] = os.open(self._dir / _seg_name(s), os.O_RDONLY | os.O_CLOEXEC)
            except OSError as err:
                fds[s] = err
        bases = numpy.cumsum([0] + [_aligned(p[2]) for p in pieces]).tolist()  # aligned as the extents are
        # uninitialised (numpy.empty): the reads fill it, a zero-fill first would cost a pass over memory
        raw = numpy.empty(bases[-1] + ALIGN, dtype=numpy.uint8)
        skip = -raw.ctypes.data % ALIGN
        batch.buf = buf = raw[skip:skip + bases[-1]]  # at an ALIGN boundary: tensors can be viewed in place
        passed = len(_CHECKS) - 1
        at = numpy.zeros(n_x, numpy.int64)  # each extent's offset in buf
        fail = numpy.full(n_x, len(_CHECKS), numpy.int64)  # len(_CHECKS): not read
        batch.x_body = numpy.full(n_x, -1, numpy.int64)
        batch.x_body_len, batch.x_meta_len, batch.x_entries = (numpy.zeros(n_x, numpy.int64) for _ in range(3))
        code = numpy.full(len(hit), len(_CHECKS), numpy.int64)  # per hit: its first failed check
        failed: list = []  # (piece, error)
        raised: list = []  # exceptions of consume

        def job(p: int) -> None:
            s, o, length, a, b = pieces[p]
            fd = fds[s]
            try:
                if isinstance(fd, BaseException):
                    raise fd
                _read_into(fd, memoryview(buf)[bases[p]:bases[p] + length], o)
            except (OSError, FormatError) as err:
                failed.append((p, err))
                return
            at[a:b] = off[a:b] + (bases[p] - o)
            fail[a:b], (nl, kl, nk, tl, ml) = _verify_extents(buf, at[a:b], size[a:b], self._ns)
            batch.x_body[a:b] = numpy.where(fail[a:b] == passed, at[a:b] + _aligned(HEADER.size + nl + nk * kl), -1)
            batch.x_body_len[a:b], batch.x_meta_len[a:b], batch.x_entries[a:b] = tl, ml, nk
            # this piece's hits: their extent passed, their slot is inside it, the key at their slot is theirs
            lo, hi = numpy.searchsorted(x_sorted, [a, b])
            mine = by_x[lo:hi]
            x = key_x[mine] - a
            c = fail[a:b][x]
            inside = numpy.flatnonzero((c == passed) & (slot[mine] < nk[x]))
            good = numpy.zeros(len(mine), bool)
            if len(inside):
                xi = x[inside]
                good[inside] = _check_keys(buf, at[a:b][xi] + HEADER.size + nl[xi] + slot[mine[inside]] * kl[xi],
                                           kl[xi], [idents[i][1] for i in hit_a[mine[inside]].tolist()])
            code[mine] = c  # a failed key check reports _CHECKS[passed], "key mismatch"
            ok = mine[(c == passed) & good]
            batch.slot[hit_a[ok]] = slot[ok]
            batch.ext[hit_a[ok]] = key_x[ok]
            code[ok] = len(_CHECKS)
            if consume is not None and len(ok):
                try:
                    consume(batch, numpy.sort(hit_a[ok]))
                except BaseException as err:  # noqa: BLE001 - raised on the caller's thread below
                    raised.append(err)

        try:
            if len(pieces) == 1:
                job(0)
            else:
                with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(pieces))) as pool:
                    list(pool.map(job, range(len(pieces))))
        finally:
            for fd in fds.values():
                if isinstance(fd, int):
                    os.close(fd)
        unread = set()  # extents of pieces that could not be read: a missing or failing file is not corruption
        for p, err in failed:
            a, b = pieces[p][3], pieces[p][4]
            lo, hi = numpy.searchsorted(x_sorted, [a, b])
            if isinstance(err, FormatError):  # the segment ends inside the piece: its extents are not all there
                code[by_x[lo:hi]] = 0
                continue
            unread.update(range(a, b))
            if not isinstance(err, FileNotFoundError):  # a missing segment: evicted since the lookup
                self._io_error("read", err)
        ok = code == len(_CHECKS)
        for j in numpy.flatnonzero(~ok).tolist():
            i, x = int(hit_a[j]), int(key_x[j])
            if x in unread:
                self._drop(idents[i], got[i])  # no-op when a concurrent eviction already removed it
            else:
                self._corrupt(idents[i], FormatError(_CHECKS[int(code[j])]), got[i])
        last = {}  # segment -> its last entry served: refreshes the segment's recency
        for j in numpy.flatnonzero(ok).tolist():
            last[int(seg[key_x[j]])] = int(hit_a[j])
        dt = time.perf_counter() - t0
        with self._lock:
            self._stats["hits"] += int(ok.sum())
            self._stats["misses"] += int((~ok).sum())
            served = numpy.zeros(n_x, bool)
            served[key_x[ok]] = True
            self._stats["bytes_read"] += int(size[served].sum())
            self._stats["read_seconds"] += dt
            for i in last.values():
                if self._index.get(idents[i]) is got[i]:
                    self._touch_locked(idents[i], got[i])
        if raised:
            raise raised[0]
        return batch

    def contains_many(self, keys: list) -> list[bool]:
        """`contains` for many keys under one lock acquisition (a restore plan asks about every block)."""
        with self._lock:
            if self._closed:
                return [False] * len(keys)
            return [(self.namespace, _key_bytes(k)) in self._index for k in keys]

    def contains(self, key: bytes | str) -> bool:
        with self._lock:
            return not self._closed and (self.namespace, _key_bytes(key)) in self._index

    def discard(self, key: bytes | str) -> bool:
        """Remove an entry that its reader found unusable (it passed its checksum but does not fit what the caller
        expects, e.g. a wrong shape): it would otherwise fail on every lookup. Returns whether one was removed."""
        ident = (self.namespace, _key_bytes(key))
        with self._lock:
            e = None if self._closed or self._degraded else self._index.get(ident)
        if e is None or not self._drop(ident, e):
            return False
        self._count("discarded")
        self._log_once("discard", logging.WARNING,
                       f"evicted entry at {_seg_name(e.seg)}+{e.offset}: it does not match its reader")
        return True

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every accepted put is processed (stored or failed). True if drained."""
        with self._drained:
            ok = self._drained.wait_for(lambda: self._pending == 0, timeout)
        if ok:
            self._persist_touches()
        return ok

    def evict_to(self, target_bytes: int) -> int:
        """Evict least-recently-used segments until at most ``target_bytes`` are used. Returns bytes freed."""
        with self._write_lock:
            victims = self._pop_lru(target_bytes, 0)
            self._delete_segments(victims)
        return sum(s.size for _, s in victims)

    def stats(self) -> dict:
        with self._lock:
            s = dict(self._stats)
            s.update(used_bytes=self._used, index_bytes=self._index_bytes(), entries=len(self._index),
                     segments=len(self._segs), capacity_bytes=self.capacity,
                     queue_depth=self._q.qsize(), queue_capacity=self._q.maxsize, degraded=self._degraded is not None)
        return s

    def close(self) -> None:
        """Flush pending puts, stop the writer, persist LRU state, release the root."""
        if self._closed:
            return
        self._closing = True  # refuse new puts so the drain below terminates
        if self._thread.is_alive():
            self.flush()
            self._q.put(None)
            self._thread.join()
        self._persist_touches()
        with self._write_lock, self._lock:
            self._closed = True
            self._seal_active()
        self._release_files()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ writer

    def _writer_loop(self) -> None:
        try:  # Linux: a thread has its own nice value; under CPU contention decode runs first, the writer catches up
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
        except (AttributeError, OSError):
            pass
        while True:
            try:
                item = self._q.get(timeout=1.0)
            except queue.Empty:
                self._persist_touches()  # idle: batch LRU updates into one transaction
                continue
            if item is None:
                return
            # group commit: whatever else is queued goes into the same batch (one fsync, one transaction)
            batch, stop = [item], False
            while len(batch) < 4096 and not stop:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                else:
                    batch.append(nxt)
            try:
                self._store_batch(batch)
            except Exception:  # the thread must survive anything; the entries just are not stored
                self._count("write_errors", len(batch))
                log.exception("kvstore: unexpected writer error")
            finally:
                with self._lock:
                    for it in batch:
                        self._queued.difference_update(it[0])
                for _ in batch:
                    self._done_one()
            if stop:
                return

    def _store_batch(self, items: list[tuple[tuple, dict, bytes, bytes | None]]) -> int:
        """Append entries to the active segment(s), fsync, then index them in one transaction. Returns how many
        are stored (already stored keys count). Runs that follow each other (`put_run`'s follows) with the same
        meta and rows per entry are joined, then cut into extents of about EXTENT_MAX bytes."""
        with self._write_lock:
            t0 = time.perf_counter()
            done, groups, seen = 0, [], set()
            for keys, tensors, meta_json, follows in items:
                with self._lock:
                    if self._closed:
                        return done
                    fresh = []
                    for k in keys:
                        ident = (self.namespace, k)
                        e = self._index.get(ident)
                        if e is not None:
                            self._touch_locked(ident, e)
                        elif k not in seen:
                            fresh.append(k)
                done += len(keys) - len(fresh)  # stored already, or earlier in this batch
                if not fresh:
                    continue
                seen.update(fresh)
                n = len(keys)
                sig = (len(keys[0]), meta_json,
                       tuple((name, t.dtype, tuple(t.shape[1:]), t.shape[0] // n) for name, t in tensors.items()))
                g = groups[-1] if groups else None
                if g is not None and follows is not None and g["keys"][-1] == follows and g["sig"] == sig:
                    g["keys"] += keys
                    g["parts"].append(tensors)
                    g["fresh"].update(fresh)
                else:
                    groups.append({"keys": list(keys), "parts": [tensors], "fresh": set(fresh), "sig": sig,
                                   "meta": meta_json})
            todo = []  # (keys to index with their slots, chunks)
            cap = min(EXTENT_MAX, self.segment_max)
            for g in groups:
                try:
                    todo += self._encode_group(g, cap)
                except Exception as e:  # noqa: BLE001 - e.g. a dtype safetensors cannot store
                    self._count("write_errors")
                    self._log_once("encode", logging.ERROR, f"cannot serialize entry: {e}")
            if not todo:
                return done
            self._checkpoint_if_large()
            limit = self._entry_limit()
            sized = []
            for rows, chunks in todo:
                size = sum(map(len, chunks))
                if size > limit:
                    self._count("puts_dropped")
                    self._log_once("too_large", logging.WARNING,
                                   f"entry of {size} B exceeds the capacity of {self.capacity} B; refused")
                else:
                    sized.append((rows, chunks, size))
            # Account before writing: make room (whole LRU segments) and reserve, so disk use (segments, index
            # and WAL) stays under the cap while the batch is appended. What does not fit is written next time.
            total, accepted = 0, []
            for item in sized:
                if total + item[2] <= limit:
                    total += item[2]
                    accepted.append(item)
                else:
                    self._count("puts_dropped")
            self._delete_segments(self._pop_lru(limit, total))
            written, touched = [], set()  # (rows, seg, offset, size)
            for rows, chunks, size in accepted:
                try:
                    seg, off = self._append_record(chunks, size, touched)
                except OSError as e:
                    self._unreserve(size)
                    self._io_error("write", e)
                    continue
                written.append((rows, seg, off, size))
            try:
                for seg in touched:
                    if self._fsync:
                        self._sync_segment(seg)
            except OSError as e:  # durability unknown: index nothing of this batch (recovery truncates it)
                self._io_error("write", e)
                self._seal_active()
                return done
            finally:
                self._after_batch()
            if not written:
                return done
            now = time.time()
            try:
                with self._db_lock:
                    self._db.execute("BEGIN")
                    try:
                        self._db.executemany("INSERT OR REPLACE INTO entries VALUES (?,?,?,?,?,?,?,?)",
                                             [(self.namespace, k, s, o, n, slot, now, now)
                                              for rows, s, o, n in written for k, slot in rows])
                        self._db.execute("COMMIT")
                    except BaseException:
                        self._db.execute("ROLLBACK")
                        raise
            except sqlite3.Error as e:
                self._io_error("index", e)  # the appended bytes stay dead in their segment (counted in the quota)
                return done
            with self._lock:  # visible only now: complete, durable and indexed
                for rows, s, o, n in written:
                    seg = self._segs[s]
                    for k, slot in rows:
                        ident = (self.namespace, k)
                        self._index[ident] = _Entry(s, o, n, slot, now, now)
                        seg.live.add(ident)
                    seg.last_access = now
                    self._segs.move_to_end(s)
                    self._stats["bytes_written"] += n
                self._stats["write_seconds"] += time.perf_counter() - t0
            self._errors_in_row = 0
            return done + sum(len(w[0]) for w in written)

    def _encode_group(self, g: dict, cap: int) -> list[tuple[list[tuple[bytes, int]], list[bytes]]]:
        """Joined runs -> extents of at most about `cap` bytes (one entry at least): per extent the (key, slot)
        rows to index (its keys not stored already) and its encoded chunks."""
        keys, parts, n = g["keys"], g["parts"], len(g["keys"])
        tensors = parts[0] if len(parts) == 1 else {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
        per_row = {name: t.shape[0] // n for name, t in tensors.items()}
        per_entry = sum(t.numel() * t.element_size() for t in tensors.values()) // n + len(keys[0])
        step = max(1, cap // max(per_entry, 1))
        out = []
        for a in range(0, n, step):
            b = min(n, a + step)
            chunk = {name: t[a * per_row[name]:b * per_row[name]] for name, t in tensors.items()}
            rows = [(k, j) for j, k in enumerate(keys[a:b]) if k in g["fresh"]]
            if rows:
                out.append((rows, _encode(self._ns, keys[a:b], chunk, g["meta"])))
        return out

    def _append_record(self, chunks: list[bytes], size: int, touched: set) -> tuple[int, int]:
        """Append one record to the active segment (a new one when it is full); on a full disk evict and retry
        once. Returns (segment, offset). On error the segment is cut back to where the record began."""
        for attempt in (0, 1):
            seg = self._writable_segment(size)
            s = self._segs[seg]
            off = s.size
            try:
                self._append(s.fd, chunks)
            except OSError as e:
                try:
                    os.ftruncate(s.fd, off)
                except OSError:
                    pass  # an unindexed tail: dead bytes, cut at the next start
                # segments holding records of this batch stay (their rows are not written yet)
                if attempt or e.errno not in DISK_FULL_ERRNOS or not self._free_for_disk_full(size, touched):
                    raise
                continue
            with self._lock:
                s.size += size  # the reservation becomes segment bytes: _used is unchanged
            touched.add(seg)
            return seg, off
        raise AssertionError("unreachable")

    def _append(self, fd: int, chunks: list[bytes]) -> None:
        for c in chunks:
            _write_all(fd, c)

    def _writable_segment(self, size: int) -> int:
        """The active segment, or a new one when it would pass segment_max (a record never spans segments)."""
        if self._active is not None:
            s = self._segs.get(self._active)
            if s is not None and (s.size == 0 or s.size + size <= self.segment_max):
                return self._active
            self._seal_active()
        seg = self._next_seg
        fd = os.open(self._dir / _seg_name(seg), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self._next_seg += 1
        with self._lock:
            self._segs[seg] = _Segment(fd=fd, last_access=time.time())
        self._active = seg
        self._new_segment = True
        return seg

    def _sync_segment(self, seg: int) -> None:
        s = self._segs.get(seg)
        if s is None:
            return
        fd = s.fd if s.fd is not None else os.open(self._dir / _seg_name(seg), os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fdatasync(fd)
        finally:
            if fd != s.fd:
                os.close(fd)
        if self._new_segment:  # a new file: its directory entry must be durable too
            _fsync_dir(self._dir)
            self._new_segment = False

    def _seal_active(self) -> None:
        """Stop appending to the active segment (its fd is closed once its batch is synced)."""
        seg, self._active = self._active, None
        if seg is not None:
            self._sealed.add(seg)

    def _after_batch(self) -> None:
        """Close the fds of sealed segments; remove an active segment a failed append left empty."""
        for seg in self._sealed:
            s = self._segs.get(seg)
            if s is not None and s.fd is not None:
                os.close(s.fd)
                s.fd = None
        self._sealed.clear()
        s = self._segs.get(self._active) if self._active is not None else None
        if s is not None and s.size == 0 and not s.live:
            self._remove_segment(self._active)

    # ------------------------------------------------------------------ helpers

    def _pop_lru(self, limit: int, incoming: int, keep: set = frozenset()) -> list[tuple[int, _Segment]]:
        """Take whole least-recently-used segments out of the in-memory index until used + incoming <= limit
        (segments in `keep` stay); reserve incoming. The caller deletes the victims (_delete_segments)."""
        victims = []
        with self._lock:
            for seg in list(self._segs):
                if self._used + incoming <= limit:
                    break
                if seg in keep:
                    continue
                s = self._segs.pop(seg)
                for ident in s.live:
                    self._index.pop(ident, None)
                    self._touched.pop(ident, None)
                self._used -= s.size
                self._stats["evictions"] += len(s.live)
                self._stats["segments_evicted"] += 1
                victims.append((seg, s))
            self._used += incoming
        return victims

    def _delete_segments(self, victims) -> None:
        """Rows first, then the file: a crash in between leaves a segment no row names, which recovery deletes."""
        if not victims:
            return
        rows = [ident for _, s in victims for ident in s.live]
        try:
            with self._db_lock:
                # one transaction: each autocommitted DELETE would append its own copies of the pages to the WAL
                # (hundreds of KB for one segment of small entries, past the quota's slack)
                self._db.execute("BEGIN")
                try:
                    self._db.executemany("DELETE FROM entries WHERE namespace=? AND key=?", rows)
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
        except sqlite3.Error as e:
            self._io_error("index", e)  # rows of missing segments are dropped at the next start
        for seg, s in victims:
            if seg == self._active:
                self._active = None
            self._sealed.discard(seg)
            if s.fd is not None:
                os.close(s.fd)
                s.fd = None
            _unlink_quiet(self._dir / _seg_name(seg))

    def _remove_segment(self, seg: int) -> None:
        """Delete a segment that holds no indexed record (under _write_lock)."""
        with self._lock:
            s = self._segs.pop(seg, None)
            if s is None:
                return
            self._used -= s.size
        if seg == self._active:
            self._active = None
        self._sealed.discard(seg)
        if s.fd is not None:
            os.close(s.fd)
        _unlink_quiet(self._dir / _seg_name(seg))

    def _index_bytes(self) -> int:
        """Bytes of index.sqlite and its WAL / shared-memory files (part of the quota)."""
        total = 0
        for name in INDEX_FILES:
            try:
                total += os.stat(self.root / name).st_size
            except OSError:
                pass
        return total

    def _entry_limit(self) -> int:
        """What the segment files may use: the capacity less the index files and one commit's slack."""
        return self.capacity - self._index_bytes() - INDEX_SLACK

    def _checkpoint_if_large(self) -> None:
        """Fold the WAL into the index and truncate it once the index files pass their budget."""
        if self._db is None or self._index_bytes() <= self._index_budget:
            return
        try:
            with self._db_lock:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as e:
            self._io_error("index", e)

    def _free_for_disk_full(self, size: int, keep: set) -> bool:
        """After ENOSPC: evict LRU segments worth at least twice the entry (and an eighth of the store, so the
        next writes do not hit the wall at once); segments of the batch in flight (`keep`) stay. Returns whether
        anything was freed."""
        with self._lock:
            goal = max(2 * size, self._used // 8)
        victims = self._pop_lru(self._used - goal, 0, keep)
        self._delete_segments(victims)
        if victims:
            self._count("disk_full_evictions", sum(len(s.live) for _, s in victims))
            self._log_once("disk_full", logging.WARNING,
                           f"disk full at {self.root}: evicting least-recently-used segments to keep caching")
        return bool(victims)

    def _unreserve(self, size: int) -> None:
        with self._lock:
            self._used -= size

    def _drop(self, ident, entry: _Entry) -> bool:
        """Unindex an entry that failed on read, unless it was already replaced/evicted. Its bytes stay dead in
        its segment until the segment goes (deleted at once when it holds nothing else)."""
        with self._write_lock:
            with self._lock:
                if self._index.get(ident) is not entry:
                    return False
                del self._index[ident]
                self._touched.pop(ident, None)
                s = self._segs.get(entry.seg)
                if s is not None:
                    s.live.discard(ident)
            try:
                with self._db_lock:
                    self._db.execute("DELETE FROM entries WHERE namespace=? AND key=?", ident)
            except sqlite3.Error as e:
                self._io_error("index", e)
            if s is not None and not s.live:
                self._remove_segment(entry.seg)
        return True

    def _corrupt(self, ident, err: FormatError, entry: _Entry | None = None) -> None:
        with self._lock:
            e = entry or self._index.get(ident)
        if e is not None and self._drop(ident, e):
            self._count("corrupt_dropped")
            self._log_once(f"corrupt:{str(err).split(' ')[0]}", logging.WARNING,
                           f"dropped corrupt entry at {_seg_name(e.seg)}+{e.offset}: {err}")

    def _touch_locked(self, ident, e: _Entry) -> None:
        e.last_access = time.time()
        self._index.move_to_end(ident)
        self._touched[ident] = e.last_access
        s = self._segs.get(e.seg)
        if s is not None:
            s.last_access = e.last_access
            self._segs.move_to_end(e.seg)

    def _persist_touches(self) -> None:
        with self._lock:
            batch, self._touched = self._touched, {}
            if not batch or self._db is None or self._closed:
                return
        try:
            with self._db_lock:
                self._db.executemany("UPDATE entries SET last_access=? WHERE namespace=? AND key=?",
                                     [(t, ns, k) for (ns, k), t in batch.items()])
        except sqlite3.Error as e:
            self._io_error("index", e)  # only LRU order is lost

    def _accepting(self) -> bool:
        return not self._closing and self._degraded is None and time.monotonic() >= self._refuse_until

    def _done_one(self) -> None:
        with self._drained:
            self._pending -= 1
            self._drained.notify_all()

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._stats[name] += n

    def _log_once(self, kind: str, level: int, msg: str) -> None:
        """First occurrence of each kind at ``level``, the rest at DEBUG: a full disk must not flood logs."""
        first = kind not in self._logged
        self._logged.add(kind)
        log.log(level if first else logging.DEBUG, "kvstore: %s", msg)

    def _io_error(self, where: str, e: Exception) -> None:
        code = errno.errorcode.get(getattr(e, "errno", None) or 0, type(e).__name__)
        self._count("read_errors" if where == "read" else "write_errors")
        self._log_once(f"{where}:{code}", logging.ERROR,
                       f"{where} failed ({e}); further {code} errors are only counted")
        if where != "read":
            self._errors_in_row += 1
            if self._errors_in_row >= self.max_errors_in_row:
                # A full or failing disk: stop spending the writer on it for a while.
                self._errors_in_row = 0
                self._refuse_until = time.monotonic() + self.error_backoff_s
                self._log_once("backoff", logging.ERROR,
                               f"{self.max_errors_in_row} write errors in a row; refusing puts for {self.error_backoff_s}s")

    def _release_files(self) -> None:
        for s in self._segs.values():
            if s.fd is not None:
                os.close(s.fd)
                s.fd = None
        if self._db is not None:
            try:
                with self._db_lock:
                    self._db.close()
            except sqlite3.Error:
                pass
            self._db = None
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None
