"""TLS for the gRPC and REST front ends, optionally mutual (clients present a certificate signed by a given CA).

The files are read and checked once at start (a key that does not match its certificate, a file that is not PEM),
so a misconfigured server fails before loading any model, with a message naming the file. With mutual TLS the
caller's identity comes from its verified certificate rather than from the ``ttaserve-caller`` header it could
choose freely: sessions of one certificate are out of reach of another.
"""

from __future__ import annotations

import logging
import os
import shutil
import ssl
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
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
    return TlsConfig(cert_file, key_file, client_ca_file, cert_chain, private_key, client_ca, context)


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
    ``config`` for new connections, and listeners are told. A changed set that fails them (a key written before its
    certificate) is logged once and the served one stays. grpcio's server asks ``grpc_credentials``' fetcher before
    each handshake, the REST server is handed a new context, and the native front end reads a ``CheckedCopy``."""

    def __init__(self, config: TlsConfig, interval_s: float) -> None:
        self.config = config
        #: bumped on every reload
        self.generation = 0
        self.interval_s = interval_s
        self._seen = config.files()
        self._listeners: list[Callable[[TlsConfig], None]] = []
        self._copies: list[CheckedCopy] = []
        self._stopped = threading.Event()

    def on_reload(self, listener: Callable[[TlsConfig], None]) -> None:
        self._listeners.append(listener)

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
            return False
        if files == self._seen:
            return False
        self._seen = files
        try:
            fresh = load_tls(config.cert_file, config.key_file, config.client_ca_file)
        except ValueError as exc:
            log.warning("TLS files changed but cannot be used, still serving the certificate loaded before: %s", exc)
            return False
        self.config = fresh
        self.generation += 1
        for listener in self._listeners:
            listener(fresh)
        log.info("TLS certificate reloaded from %s", config.cert_file)
        return True

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
