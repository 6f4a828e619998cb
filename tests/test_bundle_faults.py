"""Damaged and tampered bundles: every damaged file is one error naming the file and what is wrong (never a
SafetensorError or a traceback), and a signed bundle edited without re-signing is refused."""

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from flashport.bundle import BundleError, load_model, manifest_digest, sha256_file, tensor_crc32c
from flashport.export.bundle import export

pytest.importorskip("cryptography")
from flashport.signing import SIGNATURE, SignatureError, generate_keypair, sign_bundle, verify_bundle  # noqa: E402

SHARD = "common/layer-000.safetensors"


@pytest.fixture(scope="module")
def bundle(tiny_release, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "bundle"
    export(tiny_release, out, recipe="int8", progress=False)
    return out


@pytest.fixture
def copy(bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(bundle, dst)
    return dst


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    return generate_keypair(d / "signer.pem"), generate_keypair(d / "other.pem")


def _header_len(p: Path) -> int:
    return struct.unpack("<Q", p.read_bytes()[:8])[0]


def test_every_single_byte_flip_in_a_shard_header_is_one_clear_error(copy):
    """26 flips spread over the 8-byte length and the JSON header of a shard (names, dtypes, shapes, offsets,
    metadata): each one is a BundleError naming the shard, in one line."""
    p = copy / SHARD
    orig = p.read_bytes()
    n = _header_len(p)
    offsets = sorted({0, 1, 6, 7} | {8 + (i * 7919) % n for i in range(22)})
    for off in offsets:
        b = bytearray(orig)
        b[off] ^= 0x01 if off >= 8 else 0x80
        p.write_bytes(bytes(b))
        with pytest.raises(BundleError) as e:
            load_model(copy)
        msg = str(e.value)
        assert str(p) in msg and "\n" not in msg, (off, msg)
    p.write_bytes(orig)
    load_model(copy)  # the undamaged copy loads


@pytest.mark.parametrize("damage, says", [
    (lambda d: (d / "manifest.json").unlink(), "no manifest.json"),
    (lambda d: (d / "manifest.json").write_text('{"format": "flashport-bundle",'), "manifest.json: not valid JSON"),
    (lambda d: (d / SHARD).write_bytes((d / SHARD).read_bytes()[:5000]), "layer-000.safetensors: 5000 bytes"),
    (lambda d: (d / SHARD).unlink(), "layer-000.safetensors: missing file"),
])
def test_damaged_files_on_the_command_line_are_one_line(copy, damage, says):
    damage(copy)
    r = subprocess.run([sys.executable, "-m", "flashport.cli", "generate", str(copy), "--prompt", "hi",
                        "--max-new-tokens", "1"], capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("flashport: error: ") and says in lines[0]
    assert "config.json" not in lines[0]  # a bundle is never mistaken for a checkpoint


def _retamper_manifest(d: Path, edit) -> None:
    """Edit the manifest and recompute its own digest, as an attacker without the key can."""
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    m["manifest_sha256"] = manifest_digest(m)
    (d / "manifest.json").write_text(json.dumps(m, indent=1))


def _triple_a_weight(d: Path) -> None:
    """Triple one fp32 tensor of a shard and recompute its CRC32C and the shard's sha256 in the manifest."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    p = d / SHARD
    with safe_open(p, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = "layers.0.attn_norm.weight:weight"
    tensors[name] = tensors[name] * 3
    save_file(tensors, str(p), metadata=meta)

    def edit(m):
        m["tensors"]["layers.0.attn_norm.weight"]["crc32c"]["weight"] = tensor_crc32c(tensors[name])
        m["files"][SHARD] = {"size": p.stat().st_size, "sha256": sha256_file(p)}

    _retamper_manifest(d, edit)


@pytest.mark.parametrize("tamper", [
    lambda d: _retamper_manifest(d, lambda m: m["config"].update(routed_scaling_factor=m["config"]["routed_scaling_factor"] * 3)),
    _triple_a_weight,
    lambda d: (d / "tokenizer.json").write_text((d / "tokenizer.json").read_text() + " "),  # its sha256 changes
])
def test_an_edit_without_re_signing_is_refused(copy, keys, monkeypatch, tamper):
    (priv, pub), _ = keys
    sign_bundle(copy, priv)
    verify_bundle(copy, pub)
    tamper(copy)
    load_model(copy)  # integrity checks alone accept it: the digests were recomputed (or the file is not a weight)
    with pytest.raises(SignatureError, match="modified after signing"):
        load_model(copy, public_key=pub)
    monkeypatch.setenv("FLASHPORT_PUBLIC_KEY", str(pub))  # the environment's key applies to every load
    with pytest.raises(SignatureError, match="modified after signing"):
        load_model(copy)


def test_signed_bundle_loads_and_other_keys_or_forged_records_are_refused(copy, keys, tmp_path):
    (priv, pub), (other_priv, other_pub) = keys
    with pytest.raises(SignatureError, match="not signed"):
        load_model(copy, public_key=pub)
    sign_bundle(copy, priv)
    model, _ = load_model(copy, public_key=pub)
    assert model.cfg.name == "flash-tiny"
    with pytest.raises(SignatureError, match="not by the given public key"):
        verify_bundle(copy, other_pub)
    rec = json.loads((copy / SIGNATURE).read_text())
    rec["manifest_sha256"] = "0" * 64  # the record edited to match a modified manifest
    (copy / SIGNATURE).write_text(json.dumps(rec))
    with pytest.raises(SignatureError, match="not valid"):
        verify_bundle(copy, pub)
    sign_bundle(copy, other_priv)  # re-signed by someone else: refused under the trusted key
    with pytest.raises(SignatureError, match="not by the given public key"):
        load_model(copy, public_key=pub)


def test_cli_sign_and_verify_take_key_files_and_never_print_them(tiny_release, tmp_path):
    def flashport(*args):
        return subprocess.run([sys.executable, "-m", "flashport.cli", *args], capture_output=True, text=True,
                              timeout=600, cwd=tmp_path)

    r = flashport("keygen", "--out", "k.pem")
    assert r.returncode == 0 and oct((tmp_path / "k.pem").stat().st_mode & 0o777) == "0o600"
    secret = (tmp_path / "k.pem").read_text()
    r = flashport("export", str(tiny_release), "b", "--recipe", "int8", "--sign", "k.pem")
    assert r.returncode == 0, r.stderr
    r = flashport("verify", "b", "--public-key", "k.pem.pub")
    assert r.returncode == 0 and "signature valid" in r.stdout
    r = flashport("verify", "b", "--public-key", "k.pem")  # a private key where the public one goes
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    body = "".join(secret.splitlines()[1:-1])
    for out in (r.stdout, r.stderr):
        assert body[:20] not in out and "BEGIN" not in out
    _retamper_manifest(tmp_path / "b", lambda m: m["config"].update(norm_eps=0.5))
    r = flashport("verify", "b", "--public-key", "k.pem.pub")
    assert r.returncode == 2 and "manifest.json: modified after signing" in r.stderr
    env = dict(os.environ, FLASHPORT_PUBLIC_KEY=str(tmp_path / "k.pem.pub"))
    r = subprocess.run([sys.executable, "-m", "flashport.cli", "generate", "b", "--prompt", "hi", "--max-new-tokens",
                        "1"], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert r.returncode == 2 and "modified after signing" in r.stderr and "Traceback" not in r.stderr
