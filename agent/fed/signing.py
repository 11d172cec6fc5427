"""Ed25519 signatures on global adapters (the ``cryptography`` package; no crypto of our own).

Headquarters signs each global's manifest (which carries the sha256 of the adapter's bytes), so a
box that verifies the signature against a public key from its bootstrap file, then the hash, knows
the whole adapter came from headquarters unchanged. A manifest names its key by ``key_id`` (the
first 16 hex digits of the sha256 of the raw public key), so boxes can trust an old and a new key
during a rotation.

``edge-agent keys --out DIR`` writes ``fleet.key`` (private, PKCS#8 PEM, mode 0600: it stays at
headquarters) and ``fleet.pub`` (public, PEM: it goes to every box).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.fed.wire import canonical_json, sha256_hex

PRIVATE_KEY_FILE = "fleet.key"
PUBLIC_KEY_FILE = "fleet.pub"
SIGNED_FIELDS_EXCLUDE = ("signature",)


class SignatureError(ValueError):
    """A manifest that must not be trusted: unsigned, unknown key, or a signature that does not verify."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return sha256_hex(raw)[:16]


def generate_keys(out_dir: Path, overwrite: bool = False) -> tuple[Path, Path]:
    """A new key pair in ``out_dir``; refuses to overwrite an existing private key unless told to."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out_dir / PRIVATE_KEY_FILE, out_dir / PUBLIC_KEY_FILE
    if private_path.exists() and not overwrite:
        raise FileExistsError(f"{private_path} exists; a new key would orphan every box that trusts it")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp = private_path.with_name(f".{private_path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, private_path)
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private_path, public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except ValueError as e:
        raise ValueError(f"{path}: not a PEM private key ({e})") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 key")
    return key


def load_public_keys(paths: Iterable[Path]) -> dict[str, Ed25519PublicKey]:
    """key_id -> key for every trusted public key file. Raises OSError/ValueError naming the file."""
    keys: dict[str, Ed25519PublicKey] = {}
    for path in paths:
        try:
            key = serialization.load_pem_public_key(Path(path).read_bytes())
        except ValueError as e:
            raise ValueError(f"{path}: not a PEM public key ({e})") from e
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"{path}: not an Ed25519 public key")
        keys[key_id(key)] = key
    return keys


def _signed_bytes(manifest: Mapping[str, Any]) -> bytes:
    return canonical_json({k: v for k, v in manifest.items() if k not in SIGNED_FIELDS_EXCLUDE})


def sign_manifest(manifest: Mapping[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """``manifest`` plus ``key_id`` and ``signature`` (base64) over its canonical JSON."""
    out = {k: v for k, v in manifest.items() if k not in SIGNED_FIELDS_EXCLUDE}
    out["key_id"] = key_id(key.public_key())
    out["signature"] = base64.b64encode(key.sign(_signed_bytes(out))).decode()
    return out


def verify_manifest(manifest: Mapping[str, Any], keys: Mapping[str, Ed25519PublicKey]) -> str:
    """The key id that signed ``manifest``; raises SignatureError if it is not signed by a trusted key."""
    signature, kid = manifest.get("signature"), manifest.get("key_id")
    if not signature:
        raise SignatureError("unsigned", "manifest carries no signature")
    if not isinstance(signature, str) or not isinstance(kid, str):
        raise SignatureError("bad_signature", "signature and key_id must be strings")
    key = keys.get(kid)
    if key is None:
        raise SignatureError("unknown_key", f"signed by key {kid!r}, which this box does not trust")
    try:
        key.verify(base64.b64decode(signature, validate=True), _signed_bytes(manifest))
    except (InvalidSignature, ValueError) as e:
        raise SignatureError("bad_signature", "signature does not verify: the manifest was changed") from e
    return kid
