"""The client side of TLS: which channel credentials a URL and the TLS arguments ask for.

TLS is on when asked for (``tls=True``), when the URL says so (``grpcs://`` or ``https://``), or when any certificate
material is given: a root certificate or a client certificate passed to a plaintext channel would otherwise be
silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

PemSource = bytes | str | Path
TLS_SCHEMES = ("grpcs://", "https://")


@dataclass(frozen=True)
class ClientTls:
    #: PEM CA bundle to verify the server with (None: the system's roots)
    root_certificates: bytes | None = None
    #: the client's own PEM certificate chain and private key, for servers that require mutual TLS
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    #: the name the server's certificate must carry, when it is not the URL's host (an IP address, a tunnel)
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)

    def options(self) -> list[tuple[str, str]]:
        return [] if self.server_name is None else [("grpc.ssl_target_name_override", self.server_name)]


def client_tls(
    url: str,
    *,
    tls: bool,
    root_certificates: PemSource | None,
    certificate_chain: PemSource | None,
    private_key: PemSource | None,
    server_name: str | None,
) -> ClientTls | None:
    """The TLS settings of a channel, or None for plaintext; ValueError for a certificate without its key."""
    if (certificate_chain is None) != (private_key is None):
        raise ValueError("certificate_chain and private_key go together: give both (mutual TLS) or neither")
    material = (root_certificates, certificate_chain, private_key, server_name)
    if not (tls or url.startswith(TLS_SCHEMES) or any(item is not None for item in material)):
        return None
    return ClientTls(read_pem(root_certificates), read_pem(certificate_chain), read_pem(private_key), server_name)


def read_pem(source: PemSource | None) -> bytes | None:
    """PEM bytes as given, or read from a path."""
    if source is None or isinstance(source, bytes):
        return source
    return Path(source).read_bytes()
