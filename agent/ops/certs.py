"""``edge-agent certs``: a small CA for the plant's broker (the ``cryptography`` package, no crypto
of our own).

    edge-agent certs ca     --out DIR                       # DIR/ca.crt, DIR/ca.key (0600)
    edge-agent certs server --ca DIR --host broker.plant --host 10.0.0.5   # DIR/server.{crt,key}
    edge-agent certs client --ca DIR --name line3-box1      # DIR/line3-box1.{crt,key}
    edge-agent certs revoke --ca DIR DIR/line3-box1.crt     # DIR/ca.crl (mosquitto: crlfile)

The server certificate names every host name and IP address the boxes connect to (subject
alternative names: a TLS client checks the name it dialled against them). A client certificate's
common name is the device id: with ``use_identity_as_username true`` mosquitto takes it as the
user name, which is what the ACL's ``%u`` patterns key on (examples/mosquitto.acl), so it must be a
valid topic level. Keys are ECDSA P-256 (``rsa=True``: RSA 2048, for clients that lack EC) written
as unencrypted PKCS#8 PEM with mode 0600; certificates are PEM, mode 0644.

A revoked certificate goes into ``ca.crl``, signed by the CA; mosquitto refuses it once its
``crlfile`` points there and it is reloaded (SIGHUP; checked with 2.0.11). Revoking again keeps
the earlier entries; the CRL is valid for a year (``days``), and a stale one makes OpenSSL refuse
every client certificate, so renew it with ``revoke(ca_dir, [])`` in time.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.topics import SEGMENT_PATTERN

CA_CERT, CA_KEY, CA_CRL = "ca.crt", "ca.key", "ca.crl"
SERVER_NAME = "server"
DEFAULT_CA_DAYS = 3650
DEFAULT_DAYS = 825  # the longest leaf lifetime browsers still accept; rotate well before it ends
# Clocks of boxes and brokers disagree a little: certificates start a few minutes in the past.
BACKDATE = dt.timedelta(minutes=5)
_SEGMENT = re.compile(SEGMENT_PATTERN)

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key(use_rsa: bool) -> PrivateKey:
    if use_rsa:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def _write_private(path: Path, key: PrivateKey, overwrite: bool) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write(path, pem, 0o600, overwrite)


def _write(path: Path, data: bytes, mode: int, overwrite: bool) -> None:
    """Write through a temp file and rename: a reader sees the old file or the new one."""
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (--force replaces it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)  # the umask may have taken bits off
    os.replace(tmp, path)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def load_ca(ca_dir: Path) -> tuple[x509.Certificate, PrivateKey]:
    """The CA certificate and key of ``ca_dir`` (made by :func:`make_ca`)."""
    ca_dir = Path(ca_dir)
    try:
        cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), password=None)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e.filename}: no CA there (make one with `edge-agent certs ca`)") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"{ca_dir / CA_KEY}: not an EC or RSA key")
    if cert.public_key() != key.public_key():
        raise ValueError(f"{ca_dir / CA_KEY} is not the key of {ca_dir / CA_CERT}")
    return cert, key


def make_ca(
    out_dir: Path,
    common_name: str = "edge-agent broker CA",
    days: int = DEFAULT_CA_DAYS,
    *,
    use_rsa: bool = False,
    overwrite: bool = False,
) -> Issued:
    """A self-signed CA (``ca.crt``, ``ca.key``) that may sign leaf certificates only."""
    out_dir = Path(out_dir)
    if (out_dir / CA_KEY).exists() and not overwrite:
        raise FileExistsError(
            f"{out_dir / CA_KEY} exists; a new CA invalidates every certificate it signed (--force)"
        )
    key = _new_key(use_rsa)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    issued = Issued(out_dir / CA_CERT, out_dir / CA_KEY)
    _write_private(issued.key, key, overwrite=True)
    _write(issued.cert, _pem(cert), 0o644, overwrite=True)
    return issued


def _leaf(
    ca_dir: Path,
    common_name: str,
    usage: x509.ObjectIdentifier,
    sans: list[x509.GeneralName],
    out_dir: Path,
    file_name: str,
    days: int,
    use_rsa: bool,
    overwrite: bool,
) -> Issued:
    ca_cert, ca_key = load_ca(ca_dir)
    issued = Issued(out_dir / f"{file_name}.crt", out_dir / f"{file_name}.key")
    for path in (issued.cert, issued.key):
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists (--force replaces it)")
    key = _new_key(use_rsa)
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=use_rsa,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_private(issued.key, key, overwrite=True)
    _write(issued.cert, _pem(cert), 0o644, overwrite=True)
    return issued


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not re.fullmatch(r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*", host):
        raise ValueError(f"--host {host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host)


def make_server(
    ca_dir: Path,
    hosts: list[str],
    out_dir: Path | None = None,
    *,
    name: str = SERVER_NAME,
    days: int = DEFAULT_DAYS,
    use_rsa: bool = False,
    overwrite: bool = False,
) -> Issued:
    """The broker's certificate for ``hosts`` (DNS names and IP addresses), signed by the CA in ``ca_dir``."""
    if not hosts:
        raise ValueError("a server certificate needs at least one --host (the name the boxes connect to)")
    sans = [_general_name(h) for h in hosts]
    return _leaf(
        Path(ca_dir),
        hosts[0],
        ExtendedKeyUsageOID.SERVER_AUTH,
        sans,
        Path(out_dir or ca_dir),
        name,
        days,
        use_rsa,
        overwrite,
    )


def make_client(
    ca_dir: Path,
    name: str,
    out_dir: Path | None = None,
    *,
    days: int = DEFAULT_DAYS,
    use_rsa: bool = False,
    overwrite: bool = False,
) -> Issued:
    """A client certificate whose common name is ``name`` (a device id, ``aggregator``, an operator)."""
    if not _SEGMENT.match(name):
        raise ValueError(
            f"--name {name!r}: the common name becomes the broker user name the ACL puts into topics "
            f"(use_identity_as_username), so it must be a valid topic level ({SEGMENT_PATTERN})"
        )
    return _leaf(
        Path(ca_dir),
        name,
        ExtendedKeyUsageOID.CLIENT_AUTH,
        [],
        Path(out_dir or ca_dir),
        name,
        days,
        use_rsa,
        overwrite,
    )


def revoke(ca_dir: Path, certs: list[Path], days: int = 365) -> tuple[Path, list[int]]:
    """Add ``certs`` to the CA's ``ca.crl`` (made when absent; entries already there are kept).

    Returns the CRL's path and the serial numbers it lists. The CRL is valid for ``days``: run
    this again (with no certificates) before then, or a broker that checks the date refuses every
    client."""
    ca_dir = Path(ca_dir)
    ca_cert, ca_key = load_ca(ca_dir)
    crl_path = ca_dir / CA_CRL
    now = _now()
    revoked: dict[int, dt.datetime] = {}
    if crl_path.exists():
        old = x509.load_pem_x509_crl(crl_path.read_bytes())
        if not old.is_signature_valid(ca_key.public_key()):
            raise ValueError(f"{crl_path} is not signed by {ca_dir / CA_CERT}")
        revoked = {r.serial_number: r.revocation_date_utc for r in old}
    for path in certs:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
        try:
            cert.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise ValueError(f"{path} was not issued by {ca_dir / CA_CERT}") from e
        revoked.setdefault(cert.serial_number, now)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - BACKDATE)
        .next_update(now + dt.timedelta(days=days))
    )
    for serial, when in sorted(revoked.items()):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    _write(crl_path, crl.public_bytes(serialization.Encoding.PEM), 0o644, overwrite=True)
    return crl_path, sorted(revoked)


def describe(path: Path) -> str:
    """One line about a certificate: subject, names, validity (for the CLI's output)."""
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = cn[0].value if cn else "?"
    parts = [f"CN={value.decode() if isinstance(value, bytes) else value}"]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        parts.append("names " + ", ".join(str(n.value) for n in san))
    except x509.ExtensionNotFound:
        pass
    parts.append(f"valid until {cert.not_valid_after_utc:%Y-%m-%d}")
    return f"{path}: " + "; ".join(parts)


# ---- checks for validate-config ------------------------------------------------------------------


def _load_certs(path: Path, key: str) -> tuple[list[x509.Certificate], list[str]]:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return [], [f"{key}: cannot read {path}: {e.strerror or e}"]
    try:
        return x509.load_pem_x509_certificates(data), []
    except ValueError:
        return [], [f"{key}: {path} holds no PEM certificate"]


def _expiry(cert: x509.Certificate, key: str, path: Path, now: dt.datetime) -> list[str]:
    if cert.not_valid_after_utc < now:
        return [f"{key}: {path} expired on {cert.not_valid_after_utc:%Y-%m-%d}"]
    if cert.not_valid_before_utc > now:
        return [f"{key}: {path} is valid only from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (clock?)"]
    return []


def _may_be_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return True  # an old-style certificate without the extension: OpenSSL judges it


def tls_problems(ca_file: Path, cert_file: Path | None, key_file: Path | None) -> list[str]:
    """What would make a box's TLS set-up fail at once, found without a broker: files that are not
    PEM certificates or keys, expired certificates, a CA file without a CA, a key that is not the
    certificate's, an encrypted key (paho would ask for its passphrase on a terminal), a client
    certificate not meant for client authentication. Files that do not exist are left to the caller."""
    now = _now()
    problems: list[str] = []
    if Path(ca_file).is_file():
        cas, errors = _load_certs(ca_file, "broker.tls.ca_file")
        problems += errors
        for cert in cas:
            problems += _expiry(cert, "broker.tls.ca_file", ca_file, now)
        if cas and not any(_may_be_ca(c) for c in cas):
            problems.append(
                f"broker.tls.ca_file: {ca_file} holds no CA certificate (a server's or client's "
                "certificate instead? it wants the CA that signed the broker's: ca.crt)"
            )
    if cert_file is None or key_file is None or not Path(cert_file).is_file() or not Path(key_file).is_file():
        return problems
    leaf, errors = _load_certs(cert_file, "broker.tls.cert_file")
    problems += errors
    try:
        key = serialization.load_pem_private_key(Path(key_file).read_bytes(), password=None)
    except TypeError:
        return [*problems, f"broker.tls.key_file: {key_file} is encrypted; the agent needs it unencrypted"]
    except (ValueError, UnsupportedAlgorithm) as e:
        return [*problems, f"broker.tls.key_file: {key_file} is not a PEM private key ({e})"]
    except OSError as e:
        return [*problems, f"broker.tls.key_file: cannot read {key_file}: {e.strerror or e}"]
    if not leaf:
        return problems
    cert = leaf[0]
    problems += _expiry(cert, "broker.tls.cert_file", cert_file, now)
    if cert.public_key() != key.public_key():
        problems.append(f"broker.tls.key_file: {key_file} is not the key of {cert_file}")
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None
    if usages is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        problems.append(
            f"broker.tls.cert_file: {cert_file} is not for client authentication (a server "
            "certificate? make one with `edge-agent certs client --name DEVICE`)"
        )
    return problems
