"""agent.ops.certs and ``edge-agent certs``: certificates OpenSSL accepts for what they are for,
private keys kept private, a CRL that accumulates, and the TLS checks of ``validate-config``."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.cli import main
from agent.config import validate_config_file
from agent.ops import certs

OPENSSL = shutil.which("openssl")


@pytest.fixture
def ca(tmp_path) -> Path:
    certs.make_ca(tmp_path / "ca")
    return tmp_path / "ca"


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def openssl_verify(ca: Path, cert: Path, purpose: str, *extra: str) -> subprocess.CompletedProcess:
    assert OPENSSL, "the openssl CLI is part of the dev image (it checks what cryptography wrote)"
    return subprocess.run(
        [OPENSSL, "verify", "-CAfile", str(ca / "ca.crt"), "-purpose", purpose, *extra, str(cert)],
        capture_output=True,
        text=True,
    )


def test_ca_server_and_client_certificates_verify_for_their_purpose(ca, tmp_path):
    server = certs.make_server(ca, ["broker.plant", "10.0.0.5"])
    client = certs.make_client(ca, "line3-box1", tmp_path / "box")
    assert openssl_verify(ca, server.cert, "sslserver").returncode == 0
    assert openssl_verify(ca, client.cert, "sslclient").returncode == 0
    # ... and not for the other purpose: a box's certificate cannot serve as a broker's.
    assert openssl_verify(ca, client.cert, "sslserver").returncode != 0
    assert openssl_verify(ca, server.cert, "sslclient").returncode != 0
    # The server certificate names every host; hostname checks (OpenSSL's) pass for them only.
    san = load(server.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.plant"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert openssl_verify(ca, server.cert, "sslserver", "-verify_hostname", "broker.plant").returncode == 0
    assert openssl_verify(ca, server.cert, "sslserver", "-verify_ip", "10.0.0.5").returncode == 0
    assert openssl_verify(ca, server.cert, "sslserver", "-verify_hostname", "other.plant").returncode != 0
    # The client's CN is the user name mosquitto takes with use_identity_as_username.
    cn = load(client.cert).subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert cn == "line3-box1"
    assert client.cert.parent == tmp_path / "box"


def test_private_keys_are_private_and_certificates_readable(ca):
    client = certs.make_client(ca, "box-1")
    for key in (ca / "ca.key", client.key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert serialization.load_pem_private_key(key.read_bytes(), password=None)
    for cert in (ca / "ca.crt", client.cert):
        assert stat.S_IMODE(cert.stat().st_mode) == 0o644


def test_nothing_is_overwritten_without_force(ca):
    first = certs.make_client(ca, "box-1")
    before = first.cert.read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        certs.make_client(ca, "box-1")
    with pytest.raises(FileExistsError, match="invalidates every certificate"):
        certs.make_ca(ca)
    assert first.cert.read_bytes() == before
    assert certs.make_client(ca, "box-1", overwrite=True).cert.read_bytes() != before


@pytest.mark.parametrize("name", ["line3-box1/infer", "box+", "#", "", "a b"])
def test_client_names_must_be_single_topic_levels(ca, name):
    # The ACL puts the CN into topics: a '/' would reach into another box's namespace.
    with pytest.raises(ValueError, match="topic level"):
        certs.make_client(ca, name)


def test_server_hosts_are_names_or_addresses(ca):
    with pytest.raises(ValueError, match="at least one"):
        certs.make_server(ca, [])
    with pytest.raises(ValueError, match="neither"):
        certs.make_server(ca, ["not a host"])


def test_a_leaf_never_outlives_its_ca(tmp_path):
    certs.make_ca(tmp_path / "short", days=10)
    leaf = certs.make_client(tmp_path / "short", "box-1", days=825)
    assert load(leaf.cert).not_valid_after_utc <= load(tmp_path / "short" / "ca.crt").not_valid_after_utc


def test_revocations_accumulate_in_a_crl_signed_by_the_ca(ca):
    one, two = certs.make_client(ca, "box-1"), certs.make_client(ca, "box-2")
    crl_path, serials = certs.revoke(ca, [one.cert])
    assert serials == [load(one.cert).serial_number]
    _, serials = certs.revoke(ca, [two.cert])
    assert sorted(serials) == sorted([load(one.cert).serial_number, load(two.cert).serial_number])
    _, renewed = certs.revoke(ca, [])  # renewing keeps the list
    assert renewed == serials
    crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    assert crl.is_signature_valid(load(ca / "ca.crt").public_key())
    # OpenSSL, given the CRL, refuses the revoked certificate and accepts another.
    three = certs.make_client(ca, "box-3")
    assert openssl_verify(ca, one.cert, "sslclient", "-crl_check", "-CRLfile", str(crl_path)).returncode != 0
    assert (
        openssl_verify(ca, three.cert, "sslclient", "-crl_check", "-CRLfile", str(crl_path)).returncode == 0
    )


def test_revoke_refuses_another_cas_certificate(ca, tmp_path):
    certs.make_ca(tmp_path / "other")
    foreign = certs.make_client(tmp_path / "other", "box-1")
    with pytest.raises(ValueError, match="not issued by"):
        certs.revoke(ca, [foreign.cert])


# ---- the CLI --------------------------------------------------------------------------------------


def test_cli_makes_the_whole_set(tmp_path, capsys):
    d = str(tmp_path / "tls")
    assert main(["certs", "ca", "--out", d]) == 0
    assert main(["certs", "server", "--ca", d, "--host", "broker.plant", "--host", "127.0.0.1"]) == 0
    assert main(["certs", "client", "--ca", d, "--name", "box-1", "--name", "aggregator", "--rsa"]) == 0
    out = capsys.readouterr().out
    assert "names broker.plant, 127.0.0.1" in out and "CN=aggregator" in out
    names = sorted(p.name for p in Path(d).iterdir())
    assert names == sorted(
        [
            "ca.crt",
            "ca.key",
            "server.crt",
            "server.key",
            "box-1.crt",
            "box-1.key",
            "aggregator.crt",
            "aggregator.key",
        ]
    )
    assert main(["certs", "ca", "--out", d]) == 64, "an existing CA is kept"
    assert "exists" in capsys.readouterr().err
    assert main(["certs", "revoke", "--ca", d, str(Path(d) / "box-1.crt")]) == 0
    assert "1 revoked" in capsys.readouterr().out
    assert (Path(d) / "ca.crl").is_file()


# ---- validate-config ------------------------------------------------------------------------------


def bootstrap(tmp_path: Path, tls: str) -> Path:
    path = tmp_path / "box.toml"
    path.write_text(
        f'site = "s"\ndevice = "box-1"\ndata_dir = "{tmp_path / "data"}"\nbundle = "{tmp_path}"\n'
        f'[broker]\nhost = "broker.plant"\nport = 8883\n[broker.tls]\n{tls}\n'
    )
    return path


def tls_errors(tmp_path: Path, tls: str) -> list[str]:
    return [e for e in validate_config_file(bootstrap(tmp_path, tls)) if "broker.tls" in e]


def test_validate_config_passes_a_good_tls_setup(ca, tmp_path):
    client = certs.make_client(ca, "box-1")
    good = f'ca_file = "{ca / "ca.crt"}"\ncert_file = "{client.cert}"\nkey_file = "{client.key}"'
    assert tls_errors(tmp_path, good) == []


def test_validate_config_catches_broken_tls_setups(ca, tmp_path):
    one, two = certs.make_client(ca, "box-1"), certs.make_client(ca, "box-2")
    server = certs.make_server(ca, ["broker.plant"])
    expired = certs.make_client(ca, "old", days=0)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    encrypted = tmp_path / "encrypted.key"
    key = serialization.load_pem_private_key(one.key.read_bytes(), password=None)
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    ca_crt = ca / "ca.crt"
    cases = {
        "is not the key of": f'ca_file = "{ca_crt}"\ncert_file = "{one.cert}"\nkey_file = "{two.key}"',
        "not for client authentication": f'ca_file = "{ca_crt}"\ncert_file = "{server.cert}"\nkey_file = "{server.key}"',
        "holds no CA certificate": f'ca_file = "{one.cert}"',
        "holds no PEM certificate": f'ca_file = "{garbage}"',
        "is encrypted": f'ca_file = "{ca_crt}"\ncert_file = "{one.cert}"\nkey_file = "{encrypted}"',
        "expired on": f'ca_file = "{ca_crt}"\ncert_file = "{expired.cert}"\nkey_file = "{expired.key}"',
        "must be given together": f'ca_file = "{ca_crt}"\ncert_file = "{one.cert}"',
        "no such file": f'ca_file = "{tmp_path / "missing.crt"}"',
    }
    for expected, tls in cases.items():
        errors = [e for e in validate_config_file(bootstrap(tmp_path, tls)) if "tls" in e]
        assert any(expected in e for e in errors), (expected, errors)


def test_client_certificates_are_for_client_auth_only(ca):
    client = certs.make_client(ca, "box-1")
    usage = load(client.cert).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    basic = load(client.cert).extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca is False
