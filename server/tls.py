"""TLS for the gRPC and REST front ends, optionally mutual (clients present a certificate signed by a given CA).

The files are read and checked once at start (a key that does not match its certificate, a file that is not PEM),
so a misconfigured server fails before loading any model, with a message naming the file. With mutual TLS the
caller's identity comes from its verified certificate rather than from the ``ttaserve-caller`` header it could
choose freely: sessions of one certificate are out of reach of another.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import shutil
import ssl
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

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
    #: the REST server's context, built once by ``load_tls`` (building it is the key/certificate check)
    ssl_context: ssl.SSLContext = field(compare=False, repr=False)
    #: the earliest notAfter (Unix time) in ``cert_chain``: when clients start refusing the served chain (None: not
    #: readable here, though OpenSSL took the certificate)
    cert_expiry: float | None
    #: the earliest notAfter in ``client_ca``: when client certificates stop verifying; None without mutual TLS
    client_ca_expiry: float | None

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def grpc_certificates(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(self.private_key, self.cert_chain)], self.client_ca)

    def files(self) -> tuple[bytes, bytes, bytes | None]:
        return self.cert_chain, self.private_key, self.client_ca


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
    try:
        context = _rest_context(cert_file, key_file, client_ca)
    except ssl.SSLError as exc:
        raise ValueError(
            f"tls_key {key_file} does not match tls_cert {cert_file}, or one of them is unusable: {exc}"
        ) from exc
    except ValueError as exc:  # load_verify_locations on text with no usable certificate
        raise ValueError(f"tls_client_ca {client_ca_file}: {exc}") from exc
    cert_expiry = _expiry_of(cert_chain, "tls_cert", cert_file)
    client_ca_expiry = None if client_ca is None else _expiry_of(client_ca, "tls_client_ca", client_ca_file)
    return TlsConfig(
        cert_file, key_file, client_ca_file, cert_chain, private_key, client_ca, context, cert_expiry, client_ca_expiry
    )


def _expiry_of(pem: bytes, setting: str, path: Path | None) -> float | None:
    """``certificate_expiry``, or None with a warning: OpenSSL has accepted the file, so a date this reader cannot
    parse costs the expiry metric, not the start."""
    try:
        return certificate_expiry(pem)
    except ValueError as exc:
        log.warning("%s %s: cannot read when it expires (no expiry metric): %s", setting, path, exc)
        return None


_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.DOTALL)


def certificate_expiry(pem: bytes) -> float:
    """The earliest notAfter of the certificates in ``pem`` (other PEM blocks ignored), as a Unix time: a chain or a
    bundle is only as good as its first certificate to expire. ValueError when there is none or one is malformed.

    The X.509 is read here (the validity is at a fixed place in the DER), not through ``cryptography``, which the
    server does not depend on, nor ``ssl.SSLContext.get_ca_certs``, which leaves out leaf certificates."""
    blocks = _PEM_CERTIFICATE.findall(pem)
    if not blocks:
        raise ValueError("no PEM CERTIFICATE")
    try:
        return min(_not_after(base64.b64decode(block)) for block in blocks)
    except (IndexError, ValueError) as exc:  # binascii.Error is a ValueError
        raise ValueError(f"malformed certificate: {exc}") from exc


def _not_after(der: bytes) -> float:
    """notAfter of one DER certificate (RFC 5280 4.1): Certificate = SEQUENCE {tbsCertificate, ...} and
    tbsCertificate = SEQUENCE {[0] version (optional), serialNumber, signature, issuer, validity, ...} with
    validity = SEQUENCE {notBefore, notAfter}."""
    _, start, end = _der_element(der, 0)
    _, start, end = _der_element(der, start)  # tbsCertificate
    fields = _der_children(der, start, end)
    if fields[0][0] == 0xA0:  # explicit [0] version
        fields = fields[1:]
    _, start, end = fields[3]
    tag, start, end = _der_children(der, start, end)[1]
    text = der[start:end].decode("ascii")
    if tag == 0x17:  # UTCTime YYMMDDHHMMSSZ; RFC 5280 reads YY >= 50 as 19YY
        text = ("19" if int(text[:2]) >= 50 else "20") + text
    elif tag != 0x18:  # GeneralizedTime YYYYMMDDHHMMSSZ
        raise ValueError(f"notAfter has DER tag {tag:#x}, not a time")
    return datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=timezone.utc).timestamp()


def _der_element(der: bytes, offset: int) -> tuple[int, int, int]:
    """(tag, start, end) of the contents of the DER element at ``offset``."""
    tag, length, start = der[offset], der[offset + 1], offset + 2
    if length & 0x80:  # long form: the low bits count the length's bytes
        count = length & 0x7F
        length, start = int.from_bytes(der[start : start + count], "big"), start + count
    if start + length > len(der):
        raise ValueError("DER element runs past the end")
    return tag, start, start + length


def _der_children(der: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    """The elements inside a SEQUENCE's contents, ``_der_element``'s way."""
    children = []
    while start < end:
        children.append(_der_element(der, start))
        start = children[-1][2]
    return children


def _rest_context(cert_file: Path, key_file: Path, client_ca: bytes | None) -> ssl.SSLContext:
    """The REST server's context: TLS 1.2 or newer, HTTP/1.1 over ALPN, client certificates required when mutual."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    context.set_alpn_protocols(["http/1.1"])
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=client_ca.decode("ascii"))
    return context


class CheckedCopy:
    """The last checked certificate set, in a private folder (mode 0700) behind a ``current`` link that is swapped
    in one step. The native gRPC front end's certificate provider watches these files rather than the configured
    ones: the gRPC 1.51 provider takes whatever it reads, so a key replaced before its certificate would break
    every new handshake until the certificate followed."""

    def __init__(self, config: TlsConfig) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="ttaserve-tls-"))
        self.current = self.root / "current"
        self.write(config, 0)

    @property
    def key_file(self) -> Path:
        return self.current / "tls.key"

    @property
    def cert_file(self) -> Path:
        return self.current / "tls.crt"

    @property
    def client_ca_file(self) -> Path | None:
        path = self.current / "ca.crt"
        return path if path.exists() else None

    def write(self, config: TlsConfig, generation: int) -> None:
        folder = self.root / str(generation)
        folder.mkdir(mode=0o700)
        files = {"tls.key": config.private_key, "tls.crt": config.cert_chain, "ca.crt": config.client_ca}
        for name, data in files.items():
            if data is not None:
                with os.fdopen(os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
                    out.write(data)
        link = self.root / f"current.{generation}"
        link.symlink_to(folder.name)
        os.replace(link, self.current)
        stale = self.root / str(generation - 2)  # the previous set stays: the provider may be reading it
        if stale.is_dir():
            shutil.rmtree(stale)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class TlsReloader:
    """Serves rotated certificates without a restart (cert-manager renews them, kubelet swaps the Secret's files).

    Every ``interval_s`` the files are read again; a changed set that passes ``load_tls``'s checks becomes
    ``config`` for new connections, and ``on_reload`` listeners are told. A changed set that fails them (a key
    written before its certificate) is logged once and the served one stays; ``on_rejected`` listeners are told of
    that, and of every check that cannot read the files. grpcio's server asks ``grpc_credentials``' fetcher before
    each handshake, the REST server is handed a new context, and the native front end reads a ``CheckedCopy``."""

    def __init__(self, config: TlsConfig, interval_s: float) -> None:
        self.config = config
        #: bumped on every reload
        self.generation = 0
        self.interval_s = interval_s
        self._seen = config.files()
        self._listeners: list[Callable[[TlsConfig], None]] = []
        self._rejected_listeners: list[Callable[[], None]] = []
        self._copies: list[CheckedCopy] = []
        self._stopped = threading.Event()

    def on_reload(self, listener: Callable[[TlsConfig], None]) -> None:
        self._listeners.append(listener)

    def on_rejected(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` when a check refuses changed files that fail the checks, and on every check that cannot
        read them: the served set stays, and operators need to know the rotation did not happen."""
        self._rejected_listeners.append(listener)

    def check(self) -> bool:
        """Read the files now; True when a new certificate set was taken."""
        config = self.config
        try:
            files = (
                config.cert_file.read_bytes(),
                config.key_file.read_bytes(),
                None if config.client_ca_file is None else config.client_ca_file.read_bytes(),
            )
        except OSError as exc:
            log.warning("TLS files unreadable, still serving the certificate loaded before: %s", exc)
            self._rejected()
            return False
        if files == self._seen:
            return False
        self._seen = files
        try:
            fresh = load_tls(config.cert_file, config.key_file, config.client_ca_file)
        except ValueError as exc:
            log.warning("TLS files changed but cannot be used, still serving the certificate loaded before: %s", exc)
            self._rejected()
            return False
        self.config = fresh
        self.generation += 1
        for listener in self._listeners:
            listener(fresh)
        log.info("TLS certificate reloaded from %s", config.cert_file)
        return True

    def _rejected(self) -> None:
        for listener in self._rejected_listeners:
            listener()

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """grpcio's credentials, asking this object before each new connection's handshake (a number compared)."""
        served = [self.generation]

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            if served[0] == self.generation:
                return None
            served[0] = self.generation
            return self.config.grpc_certificates()

        return grpc.dynamic_ssl_server_credentials(
            self.config.grpc_certificates(), fetch, require_client_authentication=self.config.mutual
        )

    def checked_copy(self) -> CheckedCopy:
        """A private copy of the files that only ever holds checked sets (removed by ``stop``)."""
        copy = CheckedCopy(self.config)
        self._copies.append(copy)
        self.on_reload(lambda config: copy.write(config, self.generation))
        return copy

    def start(self) -> None:
        def watch() -> None:
            while not self._stopped.wait(self.interval_s):
                self.check()

        threading.Thread(target=watch, name="ttaserve-tls-reload", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()
        for copy in self._copies:
            copy.remove()


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
