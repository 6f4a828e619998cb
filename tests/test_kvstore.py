"""Tests for flashport.kv.store: format checks, recovery, quota/LRU, I/O failures, crash safety."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from flashport.kv import store as kvstore
from flashport.kv.store import DiskKVStore, KVStoreBusy, chain_hashes

NS = "deepseek-v4-flash@test"


def expected_entry(ns: str, key: str):
    """Deterministic content for (namespace, key): what a writer intends to store."""
    seed = int.from_bytes(hashlib.blake2b(f"{ns}/{key}".encode(), digest_size=8).digest(), "little") >> 2
    g = torch.Generator().manual_seed(seed)
    n = 16 + seed % 200
    tensors = {
        "kv": torch.randn(n, generator=g).to(torch.bfloat16),
        "ids": torch.randint(0, 1 << 30, (1 + seed % 7,), generator=g, dtype=torch.int64),
    }
    return tensors, {"key": key, "ns": ns, "n": n}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and a[k].contiguous().view(torch.uint8).equal(b[k].contiguous().view(torch.uint8))
        for k in a
    )


def files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "data").rglob("*") if p.is_file())


@pytest.fixture
def store(tmp_path):
    s = DiskKVStore(tmp_path / "kv", 1 << 24, NS, fsync=False)
    yield s
    s.close()


# ----------------------------------------------------------------------------- basics


def test_roundtrip_dtypes_meta_and_stats(store):
    t = {
        "fp8": torch.randn(4, 448).to(torch.float8_e4m3fn),
        "rope": torch.randn(4, 64).to(torch.bfloat16),
        "idx": torch.arange(10, dtype=torch.int32),
        "strided": torch.randn(8, 8).t(),  # non-contiguous input
    }
    assert store.put(b"\x01" * 32, t, {"tokens": 128}, sync=True)
    assert store.contains(b"\x01" * 32) and not store.contains(b"\x02" * 32)
    got, meta = store.get(b"\x01" * 32)
    assert same(got, {k: v.contiguous() for k, v in t.items()}) and meta == {"tokens": 128}
    assert store.get(b"\x02" * 32) is None
    s = store.stats()
    assert (s["hits"], s["misses"], s["entries"]) == (1, 1, 1)
    assert s["bytes_written"] == s["used_bytes"] == s["bytes_read"] > 0
    # str keys are their UTF-8 bytes; re-putting a stored key is a no-op
    assert store.put("k", *expected_entry(NS, "k"), sync=True) and store.contains(b"k")
    assert store.put("k", {"x": torch.zeros(1)}, sync=True) and same(store.get("k")[0], expected_entry(NS, "k")[0])
    with pytest.raises(TypeError):
        store.put("bad", {"x": [1, 2]})


def test_file_header_layout(store):
    store.put("key", {"x": torch.ones(3)}, {"a": 1}, sync=True)
    (f,) = files(store.root)
    raw = f.read_bytes()
    magic, ver, flags, nl, kl, tl, ml, _crc = kvstore.HEADER.unpack_from(raw)
    assert (magic, ver, flags) == (b"FPKVBLK\x00", 1, 0)
    assert raw[32 : 32 + nl] == NS.encode() and raw[32 + nl : 32 + nl + kl] == b"key"
    assert json.loads(raw[32 + nl + kl + tl :]) == {"a": 1} and len(raw) == 32 + nl + kl + tl + ml


def test_chain_hashes():
    toks = list(range(1000))
    h = chain_hashes(toks, 128, NS)
    assert len(h) == 7 and all(len(x) == 32 for x in h)  # only complete blocks
    assert chain_hashes(toks[:300], 128, NS) == h[:2]  # prefix property
    assert chain_hashes(toks, 128, "other-model") != h  # namespace is part of every hash
    changed = chain_hashes([7] + toks[1:], 128, NS)
    assert all(a != b for a, b in zip(changed, h))  # a change early invalidates all later blocks
    assert len(set(h)) == 7 and chain_hashes(toks, 128, NS) == h  # deterministic, distinct


# ----------------------------------------------------------------------------- async writer


def test_put_never_blocks_on_a_slow_writer(tmp_path, monkeypatch):
    s = DiskKVStore(tmp_path, 1 << 24, NS, queue_size=2, fsync=False)
    started, gate = threading.Event(), threading.Event()
    real = s._write_file

    def slow_write(*a):
        started.set()
        assert gate.wait(30)
        real(*a)

    monkeypatch.setattr(s, "_write_file", slow_write)
    try:
        assert s.put("a", *expected_entry(NS, "a"))
        assert started.wait(30)  # the writer is now stuck inside the write of "a"
        assert s.put("b", *expected_entry(NS, "b")) and s.put("c", *expected_entry(NS, "c"))
        assert s.put("b", *expected_entry(NS, "b"))  # already queued: no-op
        assert not s.put("d", *expected_entry(NS, "d"))  # queue full -> dropped, not blocked
        # Every put above returned while the writer was still blocked:
        assert not gate.is_set() and s.stats()["queue_depth"] == 2 and s.stats()["puts_dropped"] == 1
        assert not s.contains("a")  # not visible before it is on disk
        gate.set()
        assert s.flush(timeout=30)
        assert [s.contains(k) for k in "abcd"] == [True, True, True, False]
        assert same(s.get("c")[0], expected_entry(NS, "c")[0])
    finally:
        gate.set()
        s.close()


def test_restart_keeps_entries_and_lru_order(tmp_path):
    root = tmp_path / "kv"
    with DiskKVStore(root, 1 << 24, NS, fsync=False) as s:
        for i in range(5):
            s.put(f"k{i}", *expected_entry(NS, f"k{i}"))
        assert s.flush(30)
        s.get("k0")  # k0 becomes most recently used; persisted on flush/close
    s2 = DiskKVStore(root, 1 << 24, NS, fsync=False)
    try:
        assert s2.stats()["entries"] == 5
        assert [k for _, k in s2._index] == [b"k1", b"k2", b"k3", b"k4", b"k0"]  # k0 was read last
        for i in range(5):
            t, m = s2.get(f"k{i}")
            assert same(t, expected_entry(NS, f"k{i}")[0]) and m["key"] == f"k{i}"
    finally:
        s2.close()
    with DiskKVStore(root, 1 << 24, NS, fsync=False) as s3:
        assert list(s3._index)[-1][1] == b"k4"  # gets of the previous run were persisted in order


def test_second_process_on_same_root_is_refused_at_open(tmp_path):
    """Two stores on one directory would delete each other's files in recovery: the second one is refused when it
    opens, with one line naming the directory and the holder's pid (not a degraded store dropping puts)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from flashport.kv.store import DiskKVStore; "
         f"s = DiskKVStore({str(tmp_path)!r}, 1 << 20, 'ns', fsync=False); print('ready', flush=True); "
         "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"ready"
        with pytest.raises(KVStoreBusy) as err:
            DiskKVStore(tmp_path, 1 << 20, NS, fsync=False)
        assert str(err.value) == f"KV directory {tmp_path} is in use by another process (pid {holder.pid})"
        assert isinstance(err.value, ValueError)  # the CLI prints it as `flashport: error: ...`
    finally:
        holder.stdin.close()
        holder.wait(30)
    with DiskKVStore(tmp_path, 1 << 20, NS, fsync=False) as a:  # released with its process
        assert a.put("x", {"x": torch.ones(1)}, sync=True)
        with pytest.raises(KVStoreBusy, match="in use by this process"):
            DiskKVStore(tmp_path, 1 << 20, NS, fsync=False)
        assert a.put("y", {"x": torch.ones(1)}, sync=True)  # the refused open left the owner alone


# ----------------------------------------------------------------------------- namespace & corruption


def test_foreign_namespace_is_never_served(tmp_path):
    root = tmp_path / "kv"
    with DiskKVStore(root, 1 << 24, "model-A", fsync=False) as a:
        a.put("shared-key", *expected_entry("model-A", "shared-key"), sync=True)
    with DiskKVStore(root, 1 << 24, "model-B", fsync=False) as b:
        assert not b.contains("shared-key") and b.get("shared-key") is None
        b.put("shared-key", *expected_entry("model-B", "shared-key"), sync=True)
        assert same(b.get("shared-key")[0], expected_entry("model-B", "shared-key")[0])
    # Misplace A's file where B's entry lives and point B's row at it (a bug / tampering):
    # the header namespace check must catch it.
    a_rel, b_rel = (kvstore._rel_path(ns.encode(), b"shared-key") for ns in ("model-A", "model-B"))
    os.replace(root / "data" / a_rel, root / "data" / b_rel)
    db = sqlite3.connect(root / "index.sqlite")
    with db:
        db.execute("DELETE FROM entries WHERE namespace='model-A'")
        db.execute("UPDATE entries SET size=? WHERE namespace='model-B'", ((root / "data" / b_rel).stat().st_size,))
    db.close()
    with DiskKVStore(root, 1 << 24, "model-B", fsync=False) as b:
        assert b.contains("shared-key") and b.get("shared-key") is None
        assert b.stats()["corrupt_dropped"] == 1 and not b.contains("shared-key")


@pytest.mark.parametrize("where", ["payload", "meta", "version", "crc", "truncate"])
def test_corrupted_file_is_dropped(store, where, caplog):
    store.put("k", *expected_entry(NS, "k"), sync=True)
    (f,) = files(store.root)
    raw = bytearray(f.read_bytes())
    offset = {"payload": len(raw) // 2, "meta": len(raw) - 3, "version": 8, "crc": 29}.get(where)
    if offset is None:
        raw = raw[:-1]
    else:
        raw[offset] ^= 0x40
    f.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="flashport.kv.store"):
        assert store.get("k") is None
    s = store.stats()
    assert s["corrupt_dropped"] == 1 and s["misses"] == 1 and s["entries"] == 0 and s["used_bytes"] == 0
    assert files(store.root) == [] and "corrupt" in caplog.text
    assert store.put("k", *expected_entry(NS, "k"), sync=True) and store.get("k") is not None


def test_recovery_rules(tmp_path):
    root = tmp_path / "kv"
    with DiskKVStore(root, 1 << 24, NS, fsync=False) as s:
        for k in ("keep", "gone", "resized"):
            s.put(k, *expected_entry(NS, k), sync=True)
        paths = {k: root / "data" / s._index[(NS, k.encode())].path for k in ("keep", "gone", "resized")}
    paths["gone"].unlink()
    with open(paths["resized"], "ab") as f:
        f.write(b"x")
    orphan = root / "data" / "ab" / "deadbeef.kv"
    orphan.write_bytes(b"no index row")
    tmp = root / "data" / "cd" / "x.kv.123.4.tmp"
    tmp.write_bytes(b"half written")
    with DiskKVStore(root, 1 << 24, NS, fsync=False) as s:
        assert s.stats()["entries"] == 1 and s.contains("keep") and s.get("keep") is not None
        assert files(root) == [paths["keep"]]
        db = sqlite3.connect(root / "index.sqlite")
        assert db.execute("SELECT key FROM entries").fetchall() == [(b"keep",)]
        db.close()


def test_corrupt_index_starts_empty(tmp_path):
    root = tmp_path / "kv"
    with DiskKVStore(root, 1 << 24, NS, fsync=False) as s:
        s.put("a", *expected_entry(NS, "a"), sync=True)
    for suffix in ("-wal", "-shm"):
        (root / f"index.sqlite{suffix}").unlink(missing_ok=True)
    (root / "index.sqlite").write_bytes(b"garbage" * 1000)
    with DiskKVStore(root, 1 << 24, NS, fsync=False) as s:
        assert not s.stats()["degraded"] and s.stats()["entries"] == 0 and files(root) == []
        assert s.put("a", *expected_entry(NS, "a"), sync=True)


# ----------------------------------------------------------------------------- quota / LRU


def test_quota_never_exceeded_and_lru_keeps_hot_entries(tmp_path, monkeypatch):
    entry = {"x": torch.zeros(1000, dtype=torch.uint8)}
    probe = DiskKVStore(tmp_path / "probe", 1 << 20, NS, fsync=False)
    probe.put("k00", entry, sync=True)
    size = probe.stats()["used_bytes"]
    probe.close()
    cap = size * 10 + size // 2
    # entry-file LRU alone here (the index's share of the quota: test_quota_counts_the_index_and_its_wal)
    monkeypatch.setattr(kvstore, "INDEX_SLACK", 0)
    monkeypatch.setattr(DiskKVStore, "_index_bytes", lambda self: 0)
    s = DiskKVStore(tmp_path / "kv", cap, NS, fsync=False)
    real = s._write_file

    def checked_write(final, chunks):  # at the moment a file is written, old files + new one fit
        assert sum(p.stat().st_size for p in files(s.root)) + sum(map(len, chunks)) <= cap
        real(final, chunks)

    monkeypatch.setattr(s, "_write_file", checked_write)
    try:
        assert s.put("hot", entry, sync=True)
        for i in range(60):
            assert s.put(f"k{i:02d}", entry, sync=(i % 2 == 0))
            s.flush(30)
            assert s.get("hot") is not None  # read -> most recently used -> survives
            st = s.stats()
            assert st["used_bytes"] <= cap and sum(p.stat().st_size for p in files(s.root)) == st["used_bytes"]
        st = s.stats()
        assert st["entries"] == 10 and st["evictions"] == 51
        assert [s.contains(f"k{i:02d}") for i in (50, 59)] == [False, True] and s.contains("hot")
        assert not s.put("huge", {"x": torch.zeros(cap, dtype=torch.uint8)}, sync=True)  # > capacity
        assert s.stats()["puts_dropped"] == 1 and s.contains("hot")
        assert s.evict_to(3 * size) == 7 * size and s.stats()["entries"] == 3 and s.contains("hot")
    finally:
        s.close()
    with DiskKVStore(tmp_path / "kv", 2 * size, NS, fsync=False) as s:  # cap lowered between runs
        assert s.stats()["entries"] == 2 and s.contains("hot") and len(files(s.root)) == 2


def test_quota_counts_the_index_and_its_wal(tmp_path):
    """Entry files + index.sqlite + its WAL and shm stay under the capacity while many small entries churn (the
    WAL alone grows to megabytes between SQLite's automatic checkpoints)."""
    cap = 256 << 10
    s = DiskKVStore(tmp_path, cap, NS, fsync=False)
    entry = {"x": torch.zeros(200, dtype=torch.uint8)}
    worst = 0
    try:
        for i in range(1500):
            assert s.put(f"k{i:04d}", entry, sync=True)
            if i % 50 == 0:
                worst = max(worst, sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()))
        st = s.stats()
        assert st["evictions"] > 0 and st["entries"] > 100 and st["index_bytes"] > 0
    finally:
        s.close()
    assert worst <= cap, f"{worst} bytes on disk for a capacity of {cap}"


def test_disk_full_evicts_and_keeps_caching(tmp_path, monkeypatch):
    """A disk that fills up below the quota (other files on it): the store evicts LRU entries and retries, so new
    prefixes keep being cached instead of failing until a restart."""
    s = DiskKVStore(tmp_path, 1 << 30, NS, fsync=False)
    entry = {"x": torch.zeros(1000, dtype=torch.uint8)}
    disk = 8 * 1200  # room for about eight entries
    real = kvstore._write_all

    def small_disk(fd, buf):
        if sum(p.stat().st_size for p in (tmp_path / "data").rglob("*") if p.is_file()) + len(buf) > disk:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, buf)

    monkeypatch.setattr(kvstore, "_write_all", small_disk)
    try:
        for i in range(40):
            assert s.put(f"k{i:02d}", entry, sync=True), f"put {i} failed on a full disk"
            assert s.put(f"a{i:02d}", entry)  # the async path too
            assert s.flush(30) and s.contains(f"a{i:02d}")
        st = s.stats()
        assert st["disk_full_evictions"] > 0 and st["write_errors"] == 0 and s.contains("k39")
        assert not s.contains("k00")  # the least recently used made room
    finally:
        s.close()


def test_discard_removes_an_entry_its_reader_rejects(tmp_path):
    with DiskKVStore(tmp_path, 1 << 20, NS, fsync=False) as s:
        assert s.put("a", {"x": torch.ones(3)}, sync=True) and s.contains("a")
        assert s.discard("a") and not s.contains("a") and not s.discard("a")
        assert s.stats()["discarded"] == 1 and s.stats()["used_bytes"] == 0 and files(tmp_path) == []


def test_concurrent_reads_while_writing_and_evicting(tmp_path, monkeypatch):
    keys = [f"c{i}" for i in range(120)]
    size = 600  # roughly one entry; a cap of ~15 entries forces constant eviction
    monkeypatch.setattr(kvstore, "INDEX_SLACK", 0)  # a cap this small is all index otherwise
    monkeypatch.setattr(DiskKVStore, "_index_bytes", lambda self: 0)
    s = DiskKVStore(tmp_path, 15 * size, NS, queue_size=8, fsync=False)
    bad, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            for k in keys:
                got = s.get(k)
                if got is not None and not same(got[0], expected_entry(NS, k)[0]):
                    bad.append(k)

    th = threading.Thread(target=reader)
    th.start()
    try:
        for k in keys:
            while not s.put(k, *expected_entry(NS, k)):
                s.flush(30)
        assert s.flush(30)
    finally:
        stop.set()
        th.join()
    st = s.stats()
    s.close()
    assert not bad and st["corrupt_dropped"] == 0 and st["hits"] > 0 and st["evictions"] > 0
    assert st["used_bytes"] <= 15 * size


# ----------------------------------------------------------------------------- I/O failures


def test_enospc_is_counted_cleaned_up_and_invisible(tmp_path, monkeypatch, caplog):
    s = DiskKVStore(tmp_path, 1 << 24, NS, fsync=False)
    real_write = os.write

    def full_disk(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    try:
        with caplog.at_level(logging.ERROR, logger="flashport.kv.store"):
            monkeypatch.setattr(os, "write", full_disk)
            assert not s.put("a", *expected_entry(NS, "a"), sync=True)
            assert s.put("b", *expected_entry(NS, "b"))  # async: accepted, then fails in the writer
            assert s.flush(30)
            monkeypatch.setattr(os, "write", real_write)
        st = s.stats()
        assert st["write_errors"] == 2 and st["entries"] == 0 and st["used_bytes"] == 0
        assert not s.contains("a") and s.get("b") is None and files(tmp_path) == []  # no temp files left
        assert caplog.text.count("ENOSPC") == 1  # logged once per kind
        assert s.put("a", *expected_entry(NS, "a"), sync=True) and s.get("a") is not None
    finally:
        s.close()


def test_persistent_write_errors_back_off(tmp_path, monkeypatch):
    s = DiskKVStore(tmp_path, 1 << 24, NS, fsync=False)
    real_open = os.open

    def read_only(path, flags, *a, **kw):  # as root chmod does not stop writes, so fake EROFS
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", read_only)
    try:
        for i in range(s.max_errors_in_row):
            assert not s.put(f"k{i}", {"x": torch.ones(1)}, sync=True)
        assert not s.put("next", {"x": torch.ones(1)})  # backing off: refused without touching disk
        st = s.stats()
        assert st["write_errors"] == s.max_errors_in_row and st["puts_dropped"] == 1
        monkeypatch.setattr(os, "open", real_open)
        s._refuse_until = 0.0  # the backoff period is over
        assert s.put("next", {"x": torch.ones(1)}, sync=True)
    finally:
        s.close()


def test_unusable_root_disables_the_tier_without_raising(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"")
    targets = [not_a_dir / "kv"]
    if os.geteuid() != 0:  # a read-only directory only stops non-root users
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        targets.append(ro / "kv")
    for root in targets:
        s = DiskKVStore(root, 1 << 20, NS)
        assert s.stats()["degraded"]
        assert not s.put("a", {"x": torch.ones(1)}) and not s.put("a", {"x": torch.ones(1)}, sync=True)
        assert s.get("a") is None and not s.contains("a") and s.flush(1)
        s.close()


# ----------------------------------------------------------------------------- crash safety

ROUNDS, PER_ROUND, CRASH_NS = 24, 400, ("model-A", "model-B")


def _crash_child(root: str, ns: str, rnd: int, wfd: int) -> None:
    """Write entries forever-ish; after each flush report the durable watermark on the pipe."""
    s = DiskKVStore(root, 1 << 30, ns, queue_size=16, fsync=True)
    for i in range(PER_ROUND):
        key = f"r{rnd}-{i}"
        t, m = expected_entry(ns, key)
        if i % 7 == 0:
            assert s.put(key, t, m, sync=True)
        else:
            while not s.put(key, t, m):
                s.flush()
        if i % 5 == 4 and s.flush():
            os.write(wfd, b"F%08d\n" % i)  # keys 0..i are stored (one small atomic pipe write)
    os._exit(0)


def _crash_helper_main(root: str, seed: int) -> None:
    """Runs in one subprocess (torch imported once): fork a writer per round, SIGKILL it at a random time."""
    import random
    import signal
    import time

    rng = random.Random(seed)
    for rnd in range(ROUNDS):
        ns = CRASH_NS[rnd % 2]
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                _crash_child(root, ns, rnd, w)
            finally:
                os._exit(1)
        os.close(w)
        time.sleep(rng.uniform(0.0, 0.35))  # includes kills during open/recovery
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
        os.close(r)
        marks = [int(line[1:]) for line in data.split(b"\n") if line.startswith(b"F")]
        print(json.dumps({"round": rnd, "ns": ns, "flushed": max(marks, default=-1)}), flush=True)


def test_sigkill_during_writes_never_serves_bad_entries(tmp_path):
    root = tmp_path / "kv"
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        f"import test_kvstore as t; t._crash_helper_main({str(root)!r}, {os.getpid()})"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rounds = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rounds) == ROUNDS and sum(r["flushed"] >= 0 for r in rounds) >= ROUNDS // 2
    assert any(0 <= r["flushed"] < PER_ROUND - 5 for r in rounds)  # some kills hit mid-stream
    for ns in CRASH_NS:
        with DiskKVStore(root, 1 << 30, ns, fsync=False) as s:
            assert not s.stats()["degraded"]
            served = 0
            for r in rounds:
                for i in range(PER_ROUND):
                    key = f"r{r['round']}-{i}"
                    got = s.get(key)
                    if r["ns"] != ns:
                        assert got is None, f"{key} of {r['ns']} served under {ns}"
                        continue
                    if i <= r["flushed"]:
                        assert got is not None, f"flushed entry {key} lost"
                    if got is not None:
                        served += 1
                        t, m = expected_entry(ns, key)
                        assert same(got[0], t) and got[1] == m
            st = s.stats()
            assert st["corrupt_dropped"] == 0 and st["hits"] == served
        assert not list((root / "data").rglob("*.tmp"))
