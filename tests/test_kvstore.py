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
    return sorted(p for p in (root / "segments").rglob("*") if p.is_file())


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
    """One extent as docs/kv-store.md draws it: a 36-byte header, namespace, keys, zero padding to 64, the
    safetensors payload, the meta, zero padding to 64; a put is an extent of one entry."""
    store.put("key", {"x": torch.ones(3)}, {"a": 1}, sync=True)
    store.put_run(["k1", "k2"], {"x": torch.arange(4.0)}, {"b": 2}, sync=True)
    (f,) = files(store.root)
    raw = f.read_bytes()
    at = 0
    for keys, meta, rows in ((b"key", {"a": 1}, [[1.0, 1.0, 1.0]]), (b"k1k2", {"b": 2}, [[0.0, 1.0], [2.0, 3.0]])):
        magic, ver, flags, nl, kl, nk, tl, ml, _crc = kvstore.HEADER.unpack_from(raw, at)
        assert (magic, ver, flags, nk * kl) == (b"FPKVBLK\x00", 3, 0, len(keys)) and kvstore.HEADER.size == 36
        assert raw[at + 36:at + 36 + nl] == NS.encode() and raw[at + 36 + nl:at + 36 + nl + nk * kl] == keys
        body = at + -(-(36 + nl + nk * kl) // 64) * 64
        assert not any(raw[at + 36 + nl + nk * kl:body])  # zero padding
        x = kvstore._decode_body(raw[body:body + tl])["x"]
        assert x.reshape(nk, -1).tolist() == rows and json.loads(raw[body + tl:body + tl + ml]) == meta
        end = at + -(-(body - at + tl + ml) // 64) * 64
        assert not any(raw[body + tl + ml:end])
        at = end
    assert at == len(raw)


def test_chain_hashes():
    toks = list(range(1000))
    h = chain_hashes(toks, 128, NS)
    assert len(h) == 7 and all(len(x) == 32 for x in h)  # only complete blocks
    assert chain_hashes(toks[:300], 128, NS) == h[:2]  # prefix property
    assert chain_hashes(toks, 128, "other-model") != h  # namespace is part of every hash
    changed = chain_hashes([7] + toks[1:], 128, NS)
    assert all(a != b for a, b in zip(changed, h))  # a change early invalidates all later blocks
    assert len(set(h)) == 7 and chain_hashes(toks, 128, NS) == h  # deterministic, distinct


def test_read_batch_is_one_sequential_read_per_run(tmp_path, monkeypatch):
    """Entries written together lie together: reading 300 of them (in any order) is one positional read per
    segment, gaps of discarded entries included; each record is still verified on its own (a corrupt one is
    dropped, the others served) and the payloads are the stored bytes."""
    keys = [f"b{i:03d}" for i in range(300)]
    with DiskKVStore(tmp_path / "one", 1 << 26, NS, queue_size=512, fsync=False) as s:
        for k in keys:
            assert s.put(k, *expected_entry(NS, k))
        assert s.flush(30) and s.stats()["segments"] == 1
        assert s.discard("b100") and s.discard("b101")
        e = s._index[(NS, b"b200")]
        (seg,) = files(s.root)
        with open(seg, "r+b") as f:  # rot one byte inside b200's payload
            f.seek(e.offset + e.size // 2)
            byte = f.read(1)
            f.seek(e.offset + e.size // 2)
            f.write(bytes([byte[0] ^ 0x55]))
        reads = []
        real = kvstore._read_into
        monkeypatch.setattr(kvstore, "_read_into", lambda fd, buf, off: (reads.append(len(buf)), real(fd, buf, off)))
        order = keys[::-1]
        batch = s.read_batch(order)
        assert len(reads) == 1 and reads[0] == sum(p.stat().st_size for p in files(s.root))
        for j, k in enumerate(order):
            if k in ("b100", "b101", "b200"):
                assert not batch.found[j]
                continue
            t, m = expected_entry(NS, k)
            assert batch.meta(j) == m and same(batch.entry(j), t)
            assert batch.rows(j, 1, "kv").view(torch.uint8).numpy().tobytes() == \
                t["kv"].view(torch.uint8).numpy().tobytes()
        st = s.stats()
        assert st["corrupt_dropped"] == 1 and not s.contains("b200") and st["hits"] == 297
        assert [x is None for x in s.get_many(["b000", "b200", "zzz"])] == [False, True, True]
    # a small segment size: the same entries over many segments, one read per segment
    monkeypatch.undo()
    with DiskKVStore(tmp_path / "many", 1 << 26, NS, queue_size=512, fsync=False, segment_bytes=20_000) as s:
        for k in keys:
            assert s.put(k, *expected_entry(NS, k))
        assert s.flush(30)
        reads = []
        real = kvstore._read_into
        monkeypatch.setattr(kvstore, "_read_into", lambda fd, buf, off: (reads.append(len(buf)), real(fd, buf, off)))
        assert s.read_batch(keys).found.all()
        assert len(reads) == s.stats()["segments"] > 3


def test_read_batch_checks_every_record_of_a_run(tmp_path, monkeypatch, caplog):
    """A restore's records are checked vectorised, piece by piece, in parallel: a record too short for a header, or
    with a bad magic, version, length field, checksum, namespace or key (the last two with a valid CRC) is dropped
    alone; every other record of the same run is served with its stored bytes, and `part` copies one tensor out
    of all of them at once."""
    import crc32c

    monkeypatch.setattr(kvstore, "READ_PIECE", 8 << 10)  # many pieces, read and verified by several threads
    keys = [f"b{i:03d}" for i in range(400)]
    with DiskKVStore(tmp_path / "kv", 1 << 26, NS, queue_size=512, fsync=False) as s:
        for k in keys:
            assert s.put(k, *expected_entry(NS, k))
        assert s.flush(30)
        (seg,) = files(s.root)
        data = bytearray(seg.read_bytes())

        def rec(k):
            e = s._index[(NS, k.encode())]
            return e.offset, e.size

        def recrc(off, size):  # a record whose checksum is right for its (wrong) contents
            crc = crc32c.crc32c(bytes(data[off + 36:off + size]), crc32c.crc32c(bytes(data[off:off + 32])))
            data[off + 32:off + 36] = crc.to_bytes(4, "little")

        off, _ = rec("b010"); data[off] ^= 1                       # magic
        off, _ = rec("b050"); data[off + 8] = 2                    # version (2: the previous format)
        off, _ = rec("b090"); data[off + 29] ^= 1                  # meta length: sizes disagree
        off, size = rec("b130"); data[off + size - 70] ^= 1       # a byte near the end: checksum
        off, size = rec("b170"); data[off + 36] ^= 1; recrc(off, size)                 # namespace, valid CRC
        off, size = rec("b210"); data[off + 36 + len(NS)] ^= 1; recrc(off, size)      # key, valid CRC
        seg.write_bytes(bytes(data))
        s._index[(NS, b"b250")].size = 20  # an index row shorter than a header
        order = keys[::-1]
        with caplog.at_level(logging.WARNING, logger="flashport.kv.store"):
            batch = s.read_batch(order)
        rotten = {"b010": "bad magic", "b050": "unsupported format version", "b090": "size mismatch",
                  "b130": "checksum mismatch", "b170": "namespace mismatch", "b210": "key mismatch",
                  "b250": "truncated record"}
        assert {k for k, f in zip(order, batch.found) if not f} == set(rotten)
        for why in rotten.values():
            assert why in caplog.text
        served = [j for j, k in enumerate(order) if k not in rotten]
        for j in served:
            t, m = expected_entry(NS, order[j])
            assert batch.meta(j) == m and same(kvstore._decode_body(batch.payload(j)), t)
        n_kv = batch.entry_layout(served[0])["kv"][1]
        alike = [j for j in served if batch.entry_layout(j)["kv"][1] == n_kv]
        got = batch.part(alike, "kv")  # entries of one layout: one copy each (one entry per extent here)
        assert len(alike) > 1 and got.shape == (len(alike), 2 * n_kv[0])
        for row, j in zip(got, alike):
            assert row.tobytes() == expected_entry(NS, order[j])[0]["kv"].view(torch.uint8).numpy().tobytes()
        st = s.stats()
        assert st["corrupt_dropped"] == 7 and st["hits"] == 393 and not any(s.contains(k) for k in rotten)

def run_tensors(n: int, seed: int) -> dict:
    """A run of n blocks' tensors (rows per block: 3 of fp8 [*, 6], 1 of bf16 [*, 4])."""
    g = torch.Generator().manual_seed(seed)
    return {"q": torch.randn(3 * n, 6, generator=g).to(torch.float8_e4m3fn),
            "rope": torch.randn(n, 4, generator=g).to(torch.bfloat16)}


def block_of_run(t: dict, n: int, a: int, b: int) -> dict:
    """Blocks a .. b - 1 of a run of n blocks' tensors."""
    return {k: v[a * (v.shape[0] // n):b * (v.shape[0] // n)] for k, v in t.items()}


def test_runs_are_joined_into_extents_and_read_from_any_block(tmp_path, monkeypatch):
    """Runs that follow each other in one writer batch (same meta, same rows per entry) become one extent, cut at
    EXTENT_MAX; a read of keys starting inside an extent (a prefix hit at a block inside it) serves exactly those
    blocks' rows; a run with other meta, or that follows nothing, starts its own extent."""
    keys = [hashlib.blake2b(b"%d" % i, digest_size=32).digest() for i in range(40)]
    t = run_tensors(40, 0)
    with DiskKVStore(tmp_path / "kv", 1 << 26, NS, fsync=False) as s:
        monkeypatch.setattr(kvstore, "EXTENT_MAX", 30 * (18 + 8 + 32))  # 30 blocks (and their keys) per extent
        items = [(tuple(keys[a:b]), block_of_run(t, 40, a, b), b'{"kind":"block"}', keys[a - 1] if a else None)
                 for a, b in ((0, 10), (10, 25), (25, 40))]
        assert s._store_batch(items) == 40
        ext = [(s._index[(NS, k)].offset, s._index[(NS, k)].slot) for k in keys]
        assert len({o for o, _ in ext}) == 2 and [x for _, x in ext] == list(range(30)) + list(range(10))
        assert s.put_run(keys[:3], block_of_run(t, 40, 0, 3), sync=True)  # stored already: a no-op
        assert s.stats()["entries"] == 40 and len(files(s.root)) == 1
        batch = s.read_batch(keys[7:35])  # from block 7, across the extents' border
        assert batch.found.all() and [x[1:] for x in batch.spans(range(28))] == [(23, 0, 7), (28, 1, 0)]
        q = batch.part(range(28), "q")
        assert q.tobytes() == t["q"][21:105].view(torch.uint8).numpy().tobytes()
        assert torch.equal(batch.rows(0, 23, "rope").view(torch.int16), t["rope"][7:30].view(torch.int16))
        for i in (0, 7, 29, 30, 39):
            got, meta = s.get(keys[i])
            assert same(got, block_of_run(t, 40, i, i + 1)) and meta == {"kind": "block"}
        # other meta, or no `follows`: separate extents
        more = [hashlib.blake2b(b"x%d" % i, digest_size=32).digest() for i in range(3)]
        assert s._store_batch([((more[0],), block_of_run(t, 40, 0, 1), b"{}", None),
                               ((more[1],), block_of_run(t, 40, 1, 2), b'{"a":1}', more[0]),
                               ((more[2],), block_of_run(t, 40, 2, 3), b'{"a":1}', None)]) == 3
        assert len({s._index[(NS, k)].offset for k in more}) == 3
        with pytest.raises(ValueError):
            s.put_run([b"a", b"b"], {"x": torch.zeros(3)})  # 3 rows do not split into 2 entries
        with pytest.raises(ValueError):
            s.put_run([b"a", b"bb"], {"x": torch.zeros(2)})  # keys of one extent have one length


def test_torn_extent_is_detected_and_no_block_of_it_served(tmp_path):
    """An extent whose bytes are not what was written (a byte rots; a torn write: the file ends inside it) is
    caught by its checksum or length: none of its blocks is served, each one asked for is dropped from the index,
    and the blocks of the other extents still are."""
    keys = [hashlib.blake2b(b"%d" % i, digest_size=32).digest() for i in range(20)]
    t = run_tensors(20, 1)
    root = tmp_path / "kv"
    with DiskKVStore(root, 1 << 26, NS, fsync=False) as s:
        assert s.put_run(keys[:10], block_of_run(t, 20, 0, 10), {"kind": "block"}, sync=True)
        assert s.put_run(keys[10:], block_of_run(t, 20, 10, 20), {"kind": "block"}, sync=True)
        first, second = s._index[(NS, keys[0])], s._index[(NS, keys[10])]
    (seg,) = files(root)
    data = bytearray(seg.read_bytes())
    data[first.offset + first.size - 100] ^= 0x10  # a byte of the first extent
    seg.write_bytes(bytes(data))
    with DiskKVStore(root, 1 << 26, NS, fsync=False) as s:
        batch = s.read_batch(keys[3:])
        assert not batch.found[:7].any() and batch.found[7:].all()
        assert s.stats()["corrupt_dropped"] == 7 and not s.contains(keys[3]) and s.contains(keys[12])
    # torn at rest: the file ends inside the second extent; recovery drops its rows
    os.truncate(seg, second.offset + second.size // 2)
    with DiskKVStore(root, 1 << 26, NS, fsync=False) as s:
        assert not any(s.contains(k) for k in keys[10:])
    # torn under a live store: the rows are there, the bytes are not
    with DiskKVStore(tmp_path / "live", 1 << 26, NS, fsync=False) as s:
        assert s.put_run(keys[:10], block_of_run(t, 20, 0, 10), sync=True)
        e = s._index[(NS, keys[0])]
        os.truncate(files(s.root)[0], e.offset + e.size - 64)
        assert not s.read_batch(keys[4:10]).found.any() and not s.contains(keys[5])
        assert s.stats()["corrupt_dropped"] == 6


def test_eviction_drops_whole_least_recently_used_segments(tmp_path):
    """Over the quota, the segment whose most recent access is oldest goes, all of it; a read keeps a segment."""
    entry = {"x": torch.zeros(1000, dtype=torch.uint8)}
    with DiskKVStore(tmp_path / "probe", 1 << 20, NS, fsync=False) as probe:
        probe.put("k00", entry, sync=True)
        size = probe.stats()["used_bytes"]
    with DiskKVStore(tmp_path, 1 << 20, NS, fsync=False, segment_bytes=5 * size) as s:
        for i in range(20):  # four segments of five entries
            assert s.put(f"k{i:02d}", entry, sync=True)
        assert s.stats()["segments"] == 4
        assert s.get("k01") is not None  # the first segment is now the most recently used
        used = s.stats()["used_bytes"]
        freed = s.evict_to(used - 1)
        st = s.stats()
        assert st["segments"] == 3 and st["evictions"] == 5 and st["segments_evicted"] == 1
        assert freed == used - st["used_bytes"] == 5 * size
        assert sum(p.stat().st_size for p in files(tmp_path)) == st["used_bytes"]
        assert [s.contains(f"k{i:02d}") for i in (0, 4, 5, 9, 10)] == [True, True, False, False, True]


# ----------------------------------------------------------------------------- async writer


def test_put_never_blocks_on_a_slow_writer(tmp_path, monkeypatch):
    s = DiskKVStore(tmp_path, 1 << 24, NS, queue_size=2, fsync=False)
    started, gate = threading.Event(), threading.Event()
    real = s._append

    def slow_write(*a):
        started.set()
        assert gate.wait(30)
        real(*a)

    monkeypatch.setattr(s, "_append", slow_write)
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
    # Point B's row at A's record (a bug / tampering): the record's namespace check must catch it.
    db = sqlite3.connect(root / "index.sqlite")
    with db:
        seg, off, size = db.execute("SELECT segment, offset, size FROM entries WHERE namespace='model-A'").fetchone()
        db.execute("DELETE FROM entries WHERE namespace='model-A'")
        db.execute("UPDATE entries SET segment=?, offset=?, size=? WHERE namespace='model-B'", (seg, off, size))
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


def test_recovery_rules(tmp_path, caplog):
    """At open: rows whose record is not wholly in its segment, or whose segment is gone, are dropped; bytes past
    the last indexed record (a batch that crashed before its index insert) are cut; segments no row names and
    files that are not segments are deleted."""
    root = tmp_path / "kv"
    with DiskKVStore(root, 1 << 24, NS, fsync=False) as s:
        for k in ("keep", "cut"):
            s.put(k, *expected_entry(NS, k), sync=True)
        keep_size = s._index[(NS, b"keep")].size
    with DiskKVStore(root, 1 << 24, NS, fsync=False) as s:  # a new process appends to a new segment
        s.put("gone", *expected_entry(NS, "gone"), sync=True)
    first, second = files(root)
    os.truncate(first, first.stat().st_size - 1)  # "cut" loses its last byte: its row must go, its bytes too
    second.unlink()  # "gone" loses its segment
    orphan = root / "segments" / f"{0xff:016x}.seg"
    orphan.write_bytes(b"no index row names this segment")
    (root / "segments" / "x.tmp").write_bytes(b"not a segment")
    with caplog.at_level(logging.INFO, logger="flashport.kv.store"):
        s = DiskKVStore(root, 1 << 24, NS, fsync=False)
    try:
        assert s.stats()["entries"] == 1 and s.contains("keep") and same(s.get("keep")[0], expected_entry(NS, "keep")[0])
        assert files(root) == [first] and first.stat().st_size == keep_size == s.stats()["used_bytes"]
        db = sqlite3.connect(root / "index.sqlite")
        assert db.execute("SELECT key FROM entries").fetchall() == [(b"keep",)]
        db.close()
        assert "2 stale index rows and 1 orphan segments, truncated 1" in caplog.text
        assert s.put("new", *expected_entry(NS, "new"), sync=True)  # segment numbers are never reused
        assert f"{0x100:016x}.seg" in [p.name for p in files(root)]
    finally:
        s.close()


@pytest.mark.parametrize("old", [1, 2])
def test_old_format_directory_starts_empty(tmp_path, caplog, old):
    """A directory of an earlier store is never misread: format 1 (one file per entry under data/, index
    user_version 1) and format 2 (one record per entry in segments, user_version 2, records of version 2). The
    store starts empty in its own format, says so in one line, and removes the old files."""
    root = tmp_path / "kv"
    db = sqlite3.connect(root / "index.sqlite") if root.mkdir() is None else None
    if old == 1:
        (root / "data" / "ab").mkdir(parents=True)
        (root / "data" / "ab" / "ab12.kv").write_bytes(b"FPKVBLK\x00\x01\x00" + bytes(100))
        db.execute("CREATE TABLE entries (namespace TEXT, key BLOB, path TEXT, size INTEGER, last_access REAL,"
                   " created REAL, PRIMARY KEY(namespace, key))")
        db.execute("INSERT INTO entries VALUES (?, ?, 'ab/ab12.kv', 116, 0, 0)", (NS, b"k"))
    else:
        (root / "segments").mkdir()
        (root / "segments" / f"{1:016x}.seg").write_bytes(b"FPKVBLK\x00\x02\x00" + bytes(118))
        db.execute("CREATE TABLE entries (namespace TEXT NOT NULL, key BLOB NOT NULL, segment INTEGER NOT NULL,"
                   " offset INTEGER NOT NULL, size INTEGER NOT NULL, last_access REAL NOT NULL,"
                   " created REAL NOT NULL, PRIMARY KEY (namespace, key))")
        db.execute("INSERT INTO entries VALUES (?, ?, 1, 0, 128, 0, 0)", (NS, b"k"))
    db.execute(f"PRAGMA user_version={old}")
    db.commit()
    db.close()
    with caplog.at_level(logging.WARNING, logger="flashport.kv.store"):
        s = DiskKVStore(root, 1 << 24, NS, fsync=False)
    try:
        assert [r.getMessage() for r in caplog.records] == [
            f"kvstore: {root} holds a KV store of format {old}; starting empty in format 3"]
        assert s.stats()["entries"] == 0 and not s.contains("k") and s.get("k") is None
        assert not (root / "data").exists() and not files(root)
        assert s.put("k", *expected_entry(NS, "k"), sync=True) and s.get("k") is not None
    finally:
        s.close()


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
    real = s._append

    def checked_write(fd, chunks):  # at the moment a record is written, the segments + the new record fit
        assert sum(p.stat().st_size for p in files(s.root)) + sum(map(len, chunks)) <= cap
        real(fd, chunks)

    monkeypatch.setattr(s, "_append", checked_write)
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
    # segments of two entries: eviction drops whole segments, and the disk holds about four of them
    s = DiskKVStore(tmp_path, 1 << 30, NS, fsync=False, segment_bytes=2500)
    entry = {"x": torch.zeros(1000, dtype=torch.uint8)}
    disk = 8 * 1200  # room for about eight entries
    real = kvstore._write_all

    def small_disk(fd, buf):
        if sum(p.stat().st_size for p in files(tmp_path)) + len(buf) > disk:
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


RUN_EVERY, RUN_LEN = 10, 5  # the crash rounds also write a run of 5 entries (one extent) every 10 entries


def run_keys(rnd: int, i: int) -> list[str]:
    return [f"r{rnd}-run{i}-{k}" for k in range(RUN_LEN)]


def expected_run(ns: str, rnd: int, i: int) -> tuple[dict, dict]:
    """Deterministic content of the run written at entry i of round rnd: RUN_LEN entries of 3 rows each."""
    g = torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(f"{ns}/{rnd}/{i}".encode(), digest_size=4).digest(),
                                                     "little"))
    return ({"kv": torch.randn(3 * RUN_LEN, 8, generator=g).to(torch.bfloat16),
             "e": torch.randint(0, 255, (RUN_LEN, 2), generator=g, dtype=torch.uint8)}, {"run": i, "ns": ns})


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
        if i % RUN_EVERY == 3:  # runs that follow each other: joined into one extent when in one batch
            prev = run_keys(rnd, i - RUN_EVERY)[-1] if i >= RUN_EVERY else None
            while not s.put_run(run_keys(rnd, i), *expected_run(ns, rnd, i), follows=prev):
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
                    elif i <= r["flushed"]:
                        assert got is not None, f"flushed entry {key} lost"
                    if got is not None:
                        served += 1
                        t, m = expected_entry(ns, key)
                        assert same(got[0], t) and got[1] == m
                    if i % RUN_EVERY == 3:  # the run written here: all of it once flushed, never a wrong row
                        t, m = expected_run(r["ns"], r["round"], i)
                        for k, key in enumerate(run_keys(r["round"], i)):
                            got = s.get(key)
                            if r["ns"] != ns:
                                assert got is None, f"{key} of {r['ns']} served under {ns}"
                                continue
                            if i <= r["flushed"]:
                                assert got is not None, f"flushed run entry {key} lost"
                            if got is not None:
                                served += 1
                                assert same(got[0], {n: v[k * (v.shape[0] // RUN_LEN):(k + 1) * (v.shape[0] // RUN_LEN)]
                                                     for n, v in t.items()}) and got[1] == m
            st = s.stats()
            assert st["corrupt_dropped"] == 0 and st["hits"] == served
        assert not list((root / "data").rglob("*.tmp"))


def test_writer_thread_yields_the_cpu_to_decode(tmp_path):
    """The writer thread runs at a higher nice value than the process (Linux: nice is per thread), so under CPU
    contention decode is scheduled first and the disk waits."""
    with DiskKVStore(tmp_path / "kv", 1 << 24, NS, fsync=False) as s:
        assert s.put("k", *expected_entry(NS, "k")) and s.flush(30)
        base = os.getpriority(os.PRIO_PROCESS, 0)
        assert os.getpriority(os.PRIO_PROCESS, s._thread.native_id) == min(19, base + kvstore.WRITER_NICE) > base


def test_bench_restore_rows_compare_each_block_size_with_the_disk(tmp_path):
    """`flashport bench kv`'s restore rows: per block size (flash-tiny's and V4-Flash's), a sequence stored through
    the KV manager, restored whole (hashes, plan, reads, checks, unpacking into the state; checked bit for bit
    inside) and the same files read plainly, both cold, with their ratio."""
    from flashport.bench.kv import store_restore

    rows = store_restore("flash-tiny,v4-flash", total=2 << 20, dir=str(tmp_path), repeats=1).splitlines()
    assert rows[0].split() == ["preset", "block", "B", "blocks", "MB", "restore", "MB/s", "store", "MB/s", "disk",
                               "MB/s", "ratio"]
    got = {r.split()[0]: [float(x) for x in r.split()[1:]] for r in rows[1:]}
    assert set(got) == {"flash-tiny", "v4-flash"} and got["v4-flash"][0] > 100 * got["flash-tiny"][0]
    assert all(v[1] == (2 << 20) // v[0] and v[4] > 0 and v[5] > 0 and abs(v[6] - v[3] / v[5]) < 0.01
               for v in got.values())
