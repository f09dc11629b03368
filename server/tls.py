"""TLS for the gRPC and REST front ends, optionally mutual (clients present a certificate signed by a given CA).

The files are read and checked once at start (a key that does not match its certificate, a file that is not PEM),
so a misconfigured server fails before loading any model, with a message naming the file. With mutual TLS the
caller's identity comes from its verified certificate rather than from the ``ttaserve-caller`` header it could
choose freely: sessions of one certificate are out of reach of another.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

#: gRPC's auth-context property names for the verified client certificate
COMMON_NAME = "x509_common_name"
ALT_NAMES = "x509_subject_alternative_name"


@dataclass(frozen=True)
class TlsConfig:
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None
    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)], root_certificates=self.client_ca, require_client_auth=self.mutual
        )

    def ssl_context(self) -> ssl.SSLContext:
        """The REST server's context: TLS 1.2 or newer, HTTP/1.1 over ALPN, client certificates required when
        mutual."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        context.set_alpn_protocols(["http/1.1"])
        if self.client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cadata=self.client_ca.decode("ascii"))
        return context


def load_tls(cert_file: Path | None, key_file: Path | None, client_ca_file: Path | None) -> TlsConfig | None:
    """The checked TLS settings, or None when the server serves plaintext; ValueError naming the file at fault."""
    if cert_file is None and key_file is None:
        if client_ca_file is not None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key: mutual TLS is TLS first")
        return None
    if cert_file is None or key_file is None:
        raise ValueError("tls_cert and tls_key go together: give both or neither")
    cert_chain = _read_pem(cert_file, "tls_cert", b"CERTIFICATE")
    private_key = _read_pem(key_file, "tls_key", b"PRIVATE KEY")
    client_ca = _read_pem(client_ca_file, "tls_client_ca", b"CERTIFICATE") if client_ca_file is not None else None
    config = TlsConfig(cert_file, key_file, client_ca_file, cert_chain, private_key, client_ca)
    try:
        config.ssl_context()
    except ssl.SSLError as exc:
        raise ValueError(
            f"tls_key {key_file} does not match tls_cert {cert_file}, or one of them is unusable: {exc}"
        ) from exc
    except ValueError as exc:  # load_verify_locations on text with no usable certificate
        raise ValueError(f"tls_client_ca {client_ca_file}: {exc}") from exc
    return config


def _read_pem(path: Path, setting: str, label: bytes) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{setting} {path}: cannot read: {exc.strerror or exc}") from exc
    if b"-----BEGIN " not in data or label not in data:
        raise ValueError(f"{setting} {path}: not a PEM file with a {label.decode()}")
    return data


def identity_of(auth_context: Mapping[str, Sequence[bytes]]) -> str | None:
    """The verified client certificate's name: its common name, else its first subject alternative name; None
    without a client certificate. ``auth_context`` is gRPC's (property name -> values)."""
    for name in (COMMON_NAME, ALT_NAMES):
        values = auth_context.get(name) or ()
        for value in values:
            if value:
                return value.decode("utf-8", "replace")
    return None


def auth_context_of_certificate(certificate: Mapping[str, object] | None) -> dict[str, list[bytes]]:
    """A peer certificate as ``ssl.SSLSocket.getpeercert()`` gives it, as gRPC's auth-context properties, so HTTP
    callers are named by the same rule as gRPC callers."""
    if not certificate:
        return {}
    properties: dict[str, list[bytes]] = {}
    subject = certificate.get("subject") or ()
    names = [value for rdn in subject for key, value in rdn if key == "commonName"]  # type: ignore[attr-defined]
    if names:
        properties[COMMON_NAME] = [name.encode() for name in names]
    alt_names = [value for _kind, value in certificate.get("subjectAltName") or ()]  # type: ignore[attr-defined]
    if alt_names:
        properties[ALT_NAMES] = [name.encode() for name in alt_names]
    return properties
