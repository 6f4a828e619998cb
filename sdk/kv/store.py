"""Durable disk tier for KV blocks: a crash-safe, size-capped, opaque block store.

Each entry (a dict of tensors plus a small JSON meta) is one file, written by a
background thread so that ``put`` never stalls decode (its queue is bounded: a full
queue drops the put and counts it). A file becomes visible only after it is complete
on disk and indexed; anything that fails a check on read is dropped and reported as a
miss. The quota counts the entry files and the index with its WAL; a full disk evicts
LRU entries and retries. See docs/kv-store.md for the format and the rules.

Layout under ``root``::

    LOCK                 flock'ed by the one process that owns the store (holds its pid)
    index.sqlite         WAL-mode index: namespace, key, path, size, last_access, created
    data/00 .. data/ff   entry files ``<blake2b(namespace, key)>.kv`` (+ ``*.tmp`` while written)
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import queue
import sqlite3
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import crc32c
import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

log = logging.getLogger("flashport.kv.store")

__all__ = ["DiskKVStore", "KVStoreBusy", "chain_hashes", "FormatError", "FORMAT_VERSION", "MAGIC", "HEADER"]

# ----------------------------------------------------------------------------- format

FORMAT_VERSION = 1
MAGIC = b"FPKVBLK\x00"
# magic, version, flags, namespace_len, key_len, tensors_len, meta_len, crc32c
HEADER = struct.Struct("<8sHHHHQII")  # 32 bytes, little-endian
_CRC_OFFSET = HEADER.size - 4
INDEX_SCHEMA = 1  # PRAGMA user_version of index.sqlite


class FormatError(ValueError):
    """An entry file failed a check (truncated, bad magic/version/checksum, wrong key)."""


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


def _encode(namespace: bytes, key: bytes, tensors: dict, meta_json: bytes) -> list[bytes]:
    """Serialize one entry into file chunks (no concatenation: avoids copying the payload)."""
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    body = _st_save(cpu)
    head = HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(namespace), len(key), len(body), len(meta_json), 0)
    crc = 0
    for part in (head[:_CRC_OFFSET], namespace, key, body, meta_json):
        crc = crc32c.crc32c(part, crc)
    return [head[:_CRC_OFFSET] + struct.pack("<I", crc), namespace, key, body, meta_json]


def _read_exact(f, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise FormatError("truncated file")
    return data


def _decode_file(path: Path, namespace: bytes, key: bytes, expected_size: int):
    """Read and verify one entry file; returns (tensors, meta) or raises FormatError/OSError."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        head = _read_exact(f, HEADER.size)
        magic, version, _flags, nl, kl, tl, ml, crc = HEADER.unpack(head)
        if magic != MAGIC:
            raise FormatError("bad magic")
        if version != FORMAT_VERSION:
            raise FormatError(f"unsupported format version {version}")
        # Length check before any big read: a corrupt length field must not allocate GBs.
        if size != expected_size or size != HEADER.size + nl + kl + tl + ml:
            raise FormatError("size mismatch")
        ns, k, body, meta = (_read_exact(f, n) for n in (nl, kl, tl, ml))
    c = 0
    for part in (head[:_CRC_OFFSET], ns, k, body, meta):
        c = crc32c.crc32c(part, c)
    if c != crc:
        raise FormatError("checksum mismatch")
    if ns != namespace:  # paths embed the namespace hash, so this means a misplaced file
        raise FormatError("namespace mismatch")
    if k != key:
        raise FormatError("key mismatch")
    try:
        tensors, meta_obj = _st_load(body), json.loads(meta)
    except Exception as e:  # checksum passed, so this is a writer bug, still never served
        raise FormatError(f"undecodable payload: {e}") from e
    if not isinstance(meta_obj, dict):
        raise FormatError("meta is not an object")
    return tensors, meta_obj


def _rel_path(namespace: bytes, key: bytes) -> str:
    h = hashlib.blake2b(struct.pack("<I", len(namespace)) + namespace + key, digest_size=20).hexdigest()
    return f"{h[:2]}/{h}.kv"


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
    for start in range(0, len(token_ids) - block_tokens + 1, block_tokens):
        h = hashlib.blake2b(digest_size=32, person=b"flashport-kv-v1")
        h.update(prev)
        h.update(ns_part)
        h.update(struct.pack(f"<{block_tokens}q", *token_ids[start : start + block_tokens]))
        prev = h.digest()
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


@dataclass
class _Entry:
    path: str  # relative to root/data
    size: int
    last_access: float
    created: float


_COUNTERS = (
    "hits", "misses", "bytes_written", "bytes_read", "puts_dropped", "write_errors",
    "read_errors", "evictions", "corrupt_dropped", "discarded", "disk_full_evictions", "read_seconds",
    "write_seconds",
)
INDEX_FILES = ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm")
INDEX_SLACK = 64 << 10  # what the two commits of a put (evict, insert) may add to the WAL after the quota check
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskKVStore:
    """Opaque, durable, size-capped key -> (tensors, meta) store; see module docstring.

    Thread model: ``get``/``contains``/``put`` may be called from any thread (the engine);
    file writes happen on one background thread (or inline for ``put(sync=True)``).
    Locks: ``_lock`` guards the in-memory index and counters and is only held for dict
    operations, so a read never waits for an fsync; ``_write_lock`` serializes everything
    that creates or deletes entry files; ``_db_lock`` guards the SQLite connection.
    """

    #: consecutive write failures after which puts are refused for ``error_backoff_s``
    max_errors_in_row = 8
    error_backoff_s = 30.0

    def __init__(self, root: str | Path, capacity_bytes: int, namespace: str,
                 queue_size: int = 64, fsync: bool = True):
        """capacity_bytes: the quota for entry files plus index.sqlite and its WAL. Raises KVStoreBusy when
        another store (process) holds ``root``; any other unusable root gives a degraded store."""
        self.root = Path(root)
        self.capacity = int(capacity_bytes)
        # the WAL is checkpointed (truncated) when the index files pass this: it is counted in the quota
        self._index_budget = max(self.capacity // 8, 64 << 10)
        self.namespace = namespace
        self._ns = namespace.encode("utf-8")
        if len(self._ns) > 0xFFFF:
            raise ValueError("namespace too long")
        self._fsync = fsync
        self._data = self.root / "data"
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._db_lock = threading.Lock()
        self._drained = threading.Condition()
        self._index: OrderedDict[tuple[str, bytes], _Entry] = OrderedDict()  # LRU first
        self._touched: dict[tuple[str, bytes], float] = {}  # last_access not yet in SQLite
        self._queued: set[bytes] = set()
        self._pending = 0  # puts accepted but not yet processed
        self._used = 0  # bytes of indexed files + the reservation of the write in flight
        self._stats = dict.fromkeys(_COUNTERS, 0)
        self._logged: set[str] = set()
        self._errors_in_row = 0
        self._refuse_until = 0.0
        self._tmp_seq = 0
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
        self._data.mkdir(parents=True, exist_ok=True)
        for i in range(256):
            (self._data / f"{i:02x}").mkdir(exist_ok=True)
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
            # A corrupt index: start over. Its files become orphans and are deleted below.
            log.warning("kvstore: index unreadable (%s); starting with an empty store", e)
            for suffix in ("", "-wal", "-shm"):
                _unlink_quiet(self.root / f"index.sqlite{suffix}")
            self._db = self._open_db()
        self._recover()
        self._checkpoint_if_large()
        if self._fsync:
            _fsync_dir(self._data)
            _fsync_dir(self.root)

    def _open_db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.root / "index.sqlite", check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL survives process crashes; after power loss the last commits may
            # roll back, which recovery turns into orphan files (deleted) or missing-file
            # rows (dropped): never into a wrong entry.
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA journal_size_limit={self._index_budget // 2}")  # WAL size after a checkpoint
            if db.execute("PRAGMA user_version").fetchone()[0] not in (0, INDEX_SCHEMA):
                db.execute("DROP TABLE IF EXISTS entries")
            db.execute(
                "CREATE TABLE IF NOT EXISTS entries (namespace TEXT NOT NULL, key BLOB NOT NULL,"
                " path TEXT NOT NULL, size INTEGER NOT NULL, last_access REAL NOT NULL,"
                " created REAL NOT NULL, PRIMARY KEY (namespace, key))"
            )
            db.execute(f"PRAGMA user_version={INDEX_SCHEMA}")
            return db
        except BaseException:
            db.close()
            raise

    def _recover(self) -> None:
        """Make index and files agree: the index only names complete, renamed files."""
        on_disk: dict[str, int] = {}
        for sub in sorted(self._data.iterdir()):
            if not sub.is_dir():
                continue
            for f in sub.iterdir():
                if f.name.endswith(".tmp"):  # a write that never reached its rename
                    _unlink_quiet(f)
                else:
                    on_disk[f"{sub.name}/{f.name}"] = f.stat().st_size
        rows = self._db.execute(
            "SELECT namespace, key, path, size, last_access, created FROM entries ORDER BY last_access"
        ).fetchall()
        stale = []
        for ns, key, rel, size, last_access, created in rows:
            actual = on_disk.pop(rel, None)
            if actual != size:
                stale.append((ns, key))
                if actual is not None:
                    _unlink_quiet(self._data / rel)
                continue
            self._index[(ns, bytes(key))] = _Entry(rel, size, last_access, created)
            self._used += size
        if stale:
            self._db.executemany("DELETE FROM entries WHERE namespace=? AND key=?", stale)
        for rel in on_disk:  # files the index does not name: crash between rename and insert
            _unlink_quiet(self._data / rel)
        if stale or on_disk:
            log.info("kvstore: recovery dropped %d stale index rows and %d orphan files", len(stale), len(on_disk))
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
        k = _key_bytes(key)
        if not all(isinstance(n, str) and isinstance(t, torch.Tensor) for n, t in tensors.items()):
            raise TypeError("tensors must be a dict[str, torch.Tensor]")
        meta_json = json.dumps(meta or {}, separators=(",", ":")).encode("utf-8")  # TypeError early
        if not self._accepting():
            self._count("puts_dropped")
            return False
        if sync:
            return self._store(k, dict(tensors), meta_json)
        with self._lock:
            if (self.namespace, k) in self._index or k in self._queued:
                return True
            self._queued.add(k)
        with self._drained:
            self._pending += 1
        try:
            self._q.put_nowait((k, dict(tensors), meta_json))
            return True
        except queue.Full:
            with self._lock:
                self._queued.discard(k)
            self._done_one()
            self._count("puts_dropped")
            self._log_once("queue_full", logging.WARNING, "write queue full; dropping puts (counted in puts_dropped)")
            return False

    def get(self, key: bytes | str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """Return (tensors, meta) or None. Any failed check drops the entry and returns None."""
        ident = (self.namespace, _key_bytes(key))
        with self._lock:
            e = None if self._closed or self._degraded else self._index.get(ident)
            if e is None:
                self._stats["misses"] += 1
                return None
        t0 = time.perf_counter()
        try:
            tensors, meta = _decode_file(self._data / e.path, self._ns, ident[1], e.size)
        except FileNotFoundError:
            self._drop(ident, e)  # no-op when a concurrent eviction already removed it
            self._count("misses")
            return None
        except FormatError as err:
            if self._drop(ident, e):
                self._count("corrupt_dropped")
                self._log_once(f"corrupt:{str(err).split(' ')[0]}", logging.WARNING,
                               f"dropped corrupt entry {e.path}: {err}")
            self._count("misses")
            return None
        except OSError as err:
            self._io_error("read", err)
            self._drop(ident, e)
            self._count("misses")
            return None
        dt = time.perf_counter() - t0
        with self._lock:
            self._stats["hits"] += 1
            self._stats["bytes_read"] += e.size
            self._stats["read_seconds"] += dt
            if self._index.get(ident) is e:
                self._touch_locked(ident, e)
        return tensors, meta

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
        self._log_once("discard", logging.WARNING, f"evicted entry {e.path}: it does not match its reader")
        return True

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every accepted put is processed (stored or failed). True if drained."""
        with self._drained:
            ok = self._drained.wait_for(lambda: self._pending == 0, timeout)
        if ok:
            self._persist_touches()
        return ok

    def evict_to(self, target_bytes: int) -> int:
        """Evict least-recently-used entries until at most ``target_bytes`` are used. Returns bytes freed."""
        with self._write_lock:
            victims = self._pop_lru(target_bytes, 0)
            self._delete_files(victims)
        return sum(e.size for _, e in victims)

    def stats(self) -> dict:
        with self._lock:
            s = dict(self._stats)
            s.update(used_bytes=self._used, index_bytes=self._index_bytes(), entries=len(self._index),
                     capacity_bytes=self.capacity,
                     queue_depth=self._q.qsize(), degraded=self._degraded is not None)
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
        with self._lock:
            self._closed = True
        self._release_files()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ writer

    def _writer_loop(self) -> None:
        while True:
            try:
                item = self._q.get(timeout=1.0)
            except queue.Empty:
                self._persist_touches()  # idle: batch LRU updates into one transaction
                continue
            if item is None:
                return
            try:
                self._store(*item)
            except Exception:  # the thread must survive anything; the entry just is not stored
                self._count("write_errors")
                log.exception("kvstore: unexpected writer error")
            finally:
                with self._lock:
                    self._queued.discard(item[0])
                self._done_one()

    def _store(self, key: bytes, tensors: dict, meta_json: bytes) -> bool:
        ident = (self.namespace, key)
        with self._write_lock:
            with self._lock:
                if self._closed:
                    return False
                if ident in self._index:
                    self._touch_locked(ident, self._index[ident])
                    return True
            t0 = time.perf_counter()
            try:
                chunks = _encode(self._ns, key, tensors, meta_json)
            except Exception as e:  # e.g. a dtype safetensors cannot store
                self._count("write_errors")
                self._log_once("encode", logging.ERROR, f"cannot serialize entry: {e}")
                return False
            size = sum(map(len, chunks))
            self._checkpoint_if_large()
            limit = self._entry_limit()
            if size > limit:
                self._count("puts_dropped")
                self._log_once("too_large", logging.WARNING,
                               f"entry of {size} B exceeds the capacity of {self.capacity} B; refused")
                return False
            # Account before writing: make room (LRU) and reserve, so disk use (entries, index and
            # WAL) stays under the cap even while the temp file exists.
            self._delete_files(self._pop_lru(limit, size))
            rel = _rel_path(self._ns, key)
            try:
                try:
                    self._write_file(self._data / rel, chunks)
                except OSError as e:
                    # The disk is full below our quota (other files filled it): free space by evicting
                    # LRU entries and retry once, so a full disk never stops caching for good.
                    if e.errno not in DISK_FULL_ERRNOS or not self._free_for_disk_full(size):
                        raise
                    self._write_file(self._data / rel, chunks)
            except OSError as e:
                self._unreserve(size)
                self._io_error("write", e)
                return False
            now = time.time()
            try:
                with self._db_lock:
                    self._db.execute("INSERT OR REPLACE INTO entries VALUES (?,?,?,?,?,?)",
                                     (self.namespace, key, rel, size, now, now))
            except sqlite3.Error as e:
                _unlink_quiet(self._data / rel)  # not indexed -> must not exist
                self._unreserve(size)
                self._io_error("index", e)
                return False
            with self._lock:  # visible only now: complete, renamed, durable and indexed
                self._index[ident] = _Entry(rel, size, now, now)
                self._stats["bytes_written"] += size
                self._stats["write_seconds"] += time.perf_counter() - t0
            self._errors_in_row = 0
            return True

    def _write_file(self, final: Path, chunks: list[bytes]) -> None:
        """temp file in the same dir -> write -> fsync -> rename -> fsync dir; no leftovers on error."""
        self._tmp_seq += 1
        tmp = final.with_name(f"{final.name}.{os.getpid()}.{self._tmp_seq}.tmp")
        renamed = False
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                for c in chunks:
                    _write_all(fd, c)
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            renamed = True
            if self._fsync:
                _fsync_dir(final.parent)
        except BaseException:
            _unlink_quiet(final if renamed else tmp)
            raise

    # ------------------------------------------------------------------ helpers

    def _pop_lru(self, limit: int, incoming: int) -> list[tuple[tuple[str, bytes], _Entry]]:
        """Remove LRU entries from the in-memory index until used + incoming <= limit; reserve incoming."""
        victims = []
        with self._lock:
            while self._used + incoming > limit and self._index:
                ident, e = self._index.popitem(last=False)
                self._touched.pop(ident, None)
                self._used -= e.size
                victims.append((ident, e))
            self._used += incoming
            self._stats["evictions"] += len(victims)
        return victims

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
        """What the entry files may use: the capacity less the index files and one commit's slack."""
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

    def _free_for_disk_full(self, size: int) -> bool:
        """After ENOSPC: evict LRU entries worth at least twice the entry (and an eighth of the store, so the
        next writes do not hit the wall at once). Returns whether anything was freed."""
        with self._lock:
            others = self._used - size  # the reservation of the entry in flight is not evictable
            goal = max(2 * size, others // 8)
        victims = self._pop_lru(self._used - goal, 0)
        self._delete_files(victims)
        if victims:
            self._count("disk_full_evictions", len(victims))
            self._log_once("disk_full", logging.WARNING,
                           f"disk full at {self.root}: evicting least-recently-used entries to keep caching")
        return bool(victims)

    def _unreserve(self, size: int) -> None:
        with self._lock:
            self._used -= size

    def _delete_files(self, victims) -> None:
        """Row first, then file: a crash in between leaves an orphan file, which recovery deletes."""
        if not victims:
            return
        try:
            with self._db_lock:
                self._db.executemany("DELETE FROM entries WHERE namespace=? AND key=?", [i for i, _ in victims])
        except sqlite3.Error as e:
            self._io_error("index", e)  # rows of missing files are dropped at the next start
        for _, e in victims:
            _unlink_quiet(self._data / e.path)

    def _drop(self, ident, entry: _Entry) -> bool:
        """Remove an entry that failed on read, unless it was already replaced/evicted."""
        with self._write_lock:
            with self._lock:
                if self._index.get(ident) is not entry:
                    return False
                del self._index[ident]
                self._touched.pop(ident, None)
                self._used -= entry.size
            self._delete_files([(ident, entry)])
        return True

    def _touch_locked(self, ident, e: _Entry) -> None:
        e.last_access = time.time()
        self._index.move_to_end(ident)
        self._touched[ident] = e.last_access

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
