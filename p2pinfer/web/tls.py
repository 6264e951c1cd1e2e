"""HTTPS for the web role: certificate files, a self-signed pair for a LAN,
and the plain-HTTP listener that redirects to HTTPS.

**Certificates.** ``[web] tls_cert`` and ``tls_key`` (env
``P2PINFER_TLS_CERT``, ``P2PINFER_TLS_KEY``) name a PEM certificate chain
and its private key, e.g. from Let's Encrypt or the organisation's CA;
Hypercorn serves TLS 1.2+ with them (:mod:`.server`). Both are checked when
the role is built (:func:`check_pair`): missing, unreadable or mismatched
files are a :class:`~p2pinfer.errors.ConfigError`, not a server that fails
on its first handshake.

**Self-signed, for a LAN.** With ``tls_self_signed = true`` (env
``P2PINFER_TLS_SELF_SIGNED``) and no certificate configured, the node makes
(once) a small private CA and a server certificate signed by it, under
``<home>/tls/``:

- ``ca.pem``: the CA certificate. Give this file to clients
  (``--ca-file`` / ``P2PINFER_CA_FILE``, browsers' trust store): it is what
  lets them check that they talk to this node;
- ``ca.key`` (0600): the CA key; it only signs this node's certificate;
- ``cert.pem`` / ``key.pem`` (0600): what the server presents, for
  ``localhost``, the loopback addresses, the host name and the names and
  addresses in ``tls_hosts`` (and ``[web] host`` if it is one).

It logs a warning every start: nobody vouches for these certificates but
you, so a client that has not been given ``ca.pem`` (or that is told to
skip verification) is open to an active man in the middle. Use a
certificate from a CA your users already trust on anything beyond a LAN.
``p2pinfer tls self-signed`` makes the same files ahead of time.

**Redirect.** HTTP and HTTPS cannot share a port, so with TLS on, ``[web]
redirect_port`` (env ``P2PINFER_HTTP_REDIRECT_PORT``; unset: none) opens a
second, plain listener that answers every request with ``308 Permanent
Redirect`` to the same path on the HTTPS port (:class:`RedirectToHttps`),
and nothing else. HTTPS answers carry ``Strict-Transport-Security``, and
session and CSRF cookies are ``Secure``.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import socket
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["RedirectToHttps", "TlsFiles", "check_pair", "ensure_self_signed",
           "make_self_signed", "SELF_SIGNED_WARNING"]

log = logging.getLogger(__name__)

TLS_DIR = "tls"
SELF_SIGNED_DAYS = 825  # what browsers accept for a server certificate
SELF_SIGNED_WARNING = (
    "web: serving HTTPS with a SELF-SIGNED certificate ({cert}). Nobody vouches for it "
    "but this node: give clients {ca} (--ca-file / P2PINFER_CA_FILE) so they can check "
    "it, never tell them to skip verification, and use a certificate from a trusted CA "
    "beyond a LAN.")


@dataclass(frozen=True)
class TlsFiles:
    """The files HTTPS is served with.

    Attributes:
        cert: PEM certificate (chain) the server presents.
        key: its private key (PEM).
        ca: the CA certificate clients should trust (self-signed only).
        self_signed: made by :func:`make_self_signed`.
    """

    cert: Path
    key: Path
    ca: Path | None = None
    self_signed: bool = False


def check_pair(cert: Path, key: Path) -> None:
    """Check that ``cert`` and ``key`` load and belong together.

    Raises:
        ConfigError: naming the file and what is wrong.
    """
    for what, path in (("web.tls_cert", cert), ("web.tls_key", key)):
        if not path.is_file():
            raise ConfigError(f"{what}: no such file: {path}")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"web.tls_cert: cannot use {cert} with {key}: {exc}") from exc


def _write_private(path: Path, data: bytes) -> None:
    """Write a key file with mode 0600 (never readable by others, even briefly)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    tmp.replace(path)


def _names(hosts: Iterable[str]) -> list[Any]:
    from cryptography import x509

    out: list[Any] = []
    seen: set[str] = set()
    for host in ["localhost", "127.0.0.1", "::1", socket.gethostname(), *hosts]:
        host = host.strip().strip("[]")
        if not host or host in seen or host in ("0.0.0.0", "::"):
            continue
        seen.add(host)
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            out.append(x509.DNSName(host))
    return out


def make_self_signed(directory: Path, hosts: Sequence[str] = (), *,
                     days: int = SELF_SIGNED_DAYS) -> TlsFiles:
    """Make a private CA and a server certificate for ``hosts`` in ``directory``
    (``ca.pem``, ``ca.key``, ``cert.pem``, ``key.pem``; keys 0600), replacing
    any there. Returns the files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    host = socket.gethostname()

    def pem_key(k: Any) -> bytes:
        return bytes(k.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "p2pinfer"),
                         x509.NameAttribute(NameOID.COMMON_NAME,
                                            f"p2pinfer local CA ({host})"[:64])])
    ca = (x509.CertificateBuilder()
          .subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False),
                         critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))

    key = ec.generate_private_key(ec.SECP256R1())
    names = _names(hosts)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64]
                                                        or "localhost")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))

    files = TlsFiles(directory / "cert.pem", directory / "key.pem", directory / "ca.pem",
                     self_signed=True)
    _write_private(directory / "ca.key", pem_key(ca_key))
    _write_private(files.key, pem_key(key))
    assert files.ca is not None
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    # the chain: the server certificate, then the CA that signed it
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM)
                           + ca.public_bytes(serialization.Encoding.PEM))
    return files


def ensure_self_signed(home: Path, hosts: Sequence[str] = ()) -> TlsFiles:
    """The self-signed files under ``<home>/tls/``, made if missing (or if
    they no longer cover ``hosts`` or are about to expire)."""
    directory = home / TLS_DIR
    ca = directory / "ca.pem"
    files = TlsFiles(directory / "cert.pem", directory / "key.pem", ca, self_signed=True)
    if files.cert.is_file() and files.key.is_file() and ca.is_file() \
            and _still_good(files.cert, hosts):
        return files
    log.warning("web: making a self-signed certificate in %s", directory)
    return make_self_signed(directory, hosts)


def _still_good(cert_path: Path, hosts: Sequence[str]) -> bool:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound, OSError):
        return False
    have = {str(v) for v in san.get_values_for_type(x509.DNSName)}
    have |= {str(v) for v in san.get_values_for_type(x509.IPAddress)}
    want = {str(n.value) for n in _names(hosts)}
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=30)
    return want <= have and cert.not_valid_after_utc > soon


class RedirectToHttps:
    """ASGI app of the plain-HTTP listener: every request gets a 308 to the
    same path and query on the HTTPS port (see the module docstring).

    Args:
        https_port: the port HTTPS is served on.
    """

    def __init__(self, https_port: int) -> None:
        self.https_port = https_port

    def location(self, host_header: str, path: str, query: str) -> str:
        """Where a request for ``path`` sent to ``host_header`` is sent."""
        host = host_header.strip() or "localhost"
        if host.startswith("["):  # [v6]:port
            host = host[: host.find("]") + 1] if "]" in host else host
        elif host.count(":") == 1:
            host = host.split(":", 1)[0]
        netloc = host if self.https_port == 443 else f"{host}:{self.https_port}"
        target = path if path.startswith("/") and not path.startswith("//") else "/"
        return f"https://{netloc}{target}" + (f"?{query}" if query else "")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1")
        query = scope.get("query_string", b"").decode("latin-1")
        location = self.location(host, scope.get("path", "/"), query)
        body = f"Moved to {location}\n".encode()
        await send({"type": "http.response.start", "status": 308, "headers": [
            (b"location", location.encode("latin-1")), (b"content-type", b"text/plain"),
            (b"content-length", str(len(body)).encode()), (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": body})
