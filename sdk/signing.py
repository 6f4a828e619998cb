"""Signed bundles: an ed25519 signature over a bundle's manifest, made at export, checked at load.

    flashport keygen --out signing.key                   # signing.key (0600) and signing.key.pub
    flashport export SRC OUT --sign signing.key          # writes OUT/manifest.sig.json
    flashport verify OUT --public-key signing.key.pub    # one line: valid, or what is wrong
    FLASHPORT_PUBLIC_KEY=signing.key.pub flashport generate OUT ...   # every load requires a valid signature

What is signed: the sha256 of `manifest.json`'s exact bytes (with the bundle id and the key's id). The manifest
holds the model config, the tokenizer's sha256, the sha256 of every weight shard and every tensor's CRC32C, so
a valid signature binds all of them; checking it also checks every listed file's sha256 against the manifest
(the CRC32Cs are not cryptographic, the sha256s are). An edit anywhere (a config value, a weight with its CRC and
sha256 recomputed, the manifest's own digest recomputed) needs the private key to re-sign: without it the load is
refused. Trust model and limits: docs/export.md ("Signed bundles").

Keys are files (PEM, as `openssl genpkey -algorithm ed25519` writes; public keys also in OpenSSH form), never
command-line values, and their bytes never appear in a message or a log.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from pathlib import Path

SIGNATURE = "manifest.sig.json"
MANIFEST = "manifest.json"  # the bundle's manifest (flashport.bundle.MANIFEST; the bundle reader imports this module)
SIG_FORMAT = "flashport-bundle-signature"
SIG_VERSION = 1
PUBLIC_KEY_ENV = "FLASHPORT_PUBLIC_KEY"  # a public key file: every bundle load then requires a valid signature


class SignatureError(ValueError):
    """A signature that is missing, malformed or invalid, or a key file that cannot be used; names the file."""


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ModuleNotFoundError:
        raise SignatureError("signed bundles need the package 'cryptography': pip install 'flashport[sign]'") from None
    return serialization, ed25519


def _read_key(path: Path, loaders, key_type, what: str):
    """The key in file `path` that one of `loaders` (bytes -> key) reads and that is a `key_type`; else one
    SignatureError naming the file. A loader's own message may quote the key's bytes: it is never shown."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SignatureError(f"{path}: cannot read the {what} file ({e.strerror})") from None
    for load in loaders:
        try:
            key = load(data)
        except Exception:  # noqa: BLE001 - not this encoding
            continue
        if isinstance(key, key_type):
            return key
    raise SignatureError(f"{path}: not an {what} (PEM or OpenSSH)")


def load_private_key(path: str | Path):
    """An ed25519 private key from a PEM (PKCS#8) or OpenSSH file; warns if others can read it."""
    serialization, ed25519 = _crypto()
    path = Path(path)
    key = _read_key(path, [lambda b: serialization.load_pem_private_key(b, password=None),
                           lambda b: serialization.load_ssh_private_key(b, password=None)],
                    ed25519.Ed25519PrivateKey, "unencrypted ed25519 private key")
    if os.name == "posix" and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        import logging

        logging.getLogger("flashport").warning("%s: the private key is readable by other users (chmod 600 it)", path)
    return key


def load_public_key(path: str | Path):
    """An ed25519 public key from a PEM (SubjectPublicKeyInfo) or OpenSSH ('ssh-ed25519 ...') file."""
    serialization, ed25519 = _crypto()
    return _read_key(Path(path), [serialization.load_pem_public_key, serialization.load_ssh_public_key],
                     ed25519.Ed25519PublicKey, "ed25519 public key")


def key_id(public_key) -> str:
    """A short fingerprint of a public key: the first 16 hex digits of the sha256 of its 32 raw bytes."""
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(out: str | Path) -> tuple[Path, Path]:
    """Write a new ed25519 private key to OUT (PEM, created 0600) and its public key to OUT.pub; refuses to
    overwrite."""
    serialization, ed25519 = _crypto()
    out = Path(out)
    pub = out.with_name(out.name + ".pub")
    for p in (out, pub):
        if p.exists():
            raise SignatureError(f"{p} exists: not overwriting a key")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never world-readable, not even briefly
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return out, pub


def _payload(record: dict) -> bytes:
    fields = {k: record[k] for k in ("format", "version", "algorithm", "bundle_id", "manifest_sha256", "key_id")}
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def _manifest(bundle: Path) -> tuple[bytes, dict]:
    mf = bundle / MANIFEST
    try:
        raw = mf.read_bytes()
    except FileNotFoundError:
        raise SignatureError(f"{bundle}: no {MANIFEST} (not a bundle, or an export that did not finish)") from None
    try:
        m = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SignatureError(f"{mf}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or not isinstance(m.get("files"), dict):
        raise SignatureError(f"{mf}: not a flashport bundle manifest")
    return raw, m


def sign_bundle(bundle: str | Path, private_key_file: str | Path) -> Path:
    """Sign BUNDLE's manifest with the ed25519 key in PRIVATE_KEY_FILE; writes BUNDLE/manifest.sig.json."""
    bundle = Path(bundle)
    key = load_private_key(private_key_file)
    raw, m = _manifest(bundle)
    rec = {"format": SIG_FORMAT, "version": SIG_VERSION, "algorithm": "ed25519", "bundle_id": m.get("bundle_id"),
           "manifest_sha256": hashlib.sha256(raw).hexdigest(), "key_id": key_id(key.public_key())}
    rec["signature"] = base64.b64encode(key.sign(_payload(rec))).decode()
    out = bundle / SIGNATURE
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    os.replace(tmp, out)
    return out


def verify_bundle(bundle: str | Path, public_key_file: str | Path, check_files: bool = True,
                  progress: bool = False) -> dict:
    """Check BUNDLE's signature with the public key in PUBLIC_KEY_FILE, then (check_files) the sha256 of every
    file the manifest lists, tokenizer and weight shards included. Returns the signature record; raises
    SignatureError naming the file and what is wrong."""
    bundle = Path(bundle)
    pub = load_public_key(public_key_file)
    from cryptography.exceptions import InvalidSignature  # present: load_public_key checked

    raw, m = _manifest(bundle)
    sig_file = bundle / SIGNATURE
    try:
        rec = json.loads(sig_file.read_text())
        signature = base64.b64decode(rec["signature"], validate=True)
        _payload(rec)
    except FileNotFoundError:
        raise SignatureError(f"{bundle}: not signed (no {SIGNATURE}); a signature is required") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SignatureError(f"{sig_file}: malformed signature record ({e.__class__.__name__})") from None
    if rec.get("format") != SIG_FORMAT or rec.get("version") != SIG_VERSION or rec.get("algorithm") != "ed25519":
        raise SignatureError(f"{sig_file}: not a flashport ed25519 bundle signature (version {SIG_VERSION})")
    if rec["key_id"] != key_id(pub):
        raise SignatureError(f"{sig_file}: signed by key {rec['key_id']}, not by the given public key "
                             f"{key_id(pub)}")
    try:
        pub.verify(signature, _payload(rec))
    except InvalidSignature:
        raise SignatureError(f"{sig_file}: the signature is not valid for this key (the record was edited)") from None
    if hashlib.sha256(raw).hexdigest() != rec["manifest_sha256"]:
        raise SignatureError(f"{bundle / MANIFEST}: modified after signing (its sha256 is not the signed one)")
    if rec["bundle_id"] != m.get("bundle_id"):
        raise SignatureError(f"{sig_file}: the signature is for bundle {rec['bundle_id']!r}, not {m.get('bundle_id')!r}")
    if check_files:
        from tqdm import tqdm

        for rel, info in tqdm(sorted(m["files"].items()), desc="verify", unit="file", disable=not progress):
            p = bundle / rel
            try:
                with open(p, "rb") as f:
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
            except FileNotFoundError:
                raise SignatureError(f"{p}: missing file of signed bundle {bundle}") from None
            if digest != (info or {}).get("sha256"):
                raise SignatureError(f"{p}: modified after signing (its sha256 is not the manifest's)")
    return rec


def required_public_key(public_key: str | Path | None = None) -> Path | None:
    """The public key a load must verify against: the argument, else $FLASHPORT_PUBLIC_KEY, else None."""
    value = public_key or os.environ.get(PUBLIC_KEY_ENV) or None
    return Path(value) if value else None


def verify_cli(bundle: str, public_key: str = "") -> str:
    """Check BUNDLE's ed25519 signature and every file's sha256: verify BUNDLE --public-key PUB.pem."""
    if not public_key:
        raise SignatureError("--public-key FILE is required (the signer's public key)")
    rec = verify_bundle(bundle, public_key, progress=True)
    return f"{bundle}: signature valid (key {rec['key_id']}, bundle {rec['bundle_id']}); every file matches"


def keygen_cli(out: str = "") -> str:
    """Make an ed25519 key pair for signing bundles: keygen --out FILE (FILE 0600, FILE.pub)."""
    if not out:
        raise SignatureError("--out FILE is required (where to write the private key)")
    key, pub = generate_keypair(out)
    return f"wrote private key {key} (mode 0600: keep it secret) and public key {pub}"
