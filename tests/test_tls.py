"""TLS and mutual TLS on the gRPC (both front ends) and REST ports, with certificates from a throwaway CA (trustme):
the real tritonclient (grpc and http), the SDK and the CLI as clients; plaintext, untrusted and certificate-less
clients refused without harming the server; under mutual TLS, callers named by their certificate; the certificates'
expiry and the reloads in the metrics."""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import trustme
from cryptography import x509
from support import CIFAR_LABELS, cifar_resnet20_config, native_frontend_or_skip, seeded_resnet20, start
from support import write_model as write_model_folder

from opskit.procs import wait_until
from ttaserve.client import AsyncClient, BatchResult, Client
from ttaserve.client.cli import main as cli_main
from ttaserve.client.errors import NotFound, Unavailable
from ttaserve.protocol import kserve_v2_pb2 as pb
from ttaserve.protocol.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from ttaserve.server.app import ServerHandle
from ttaserve.server.metrics import Metrics
from ttaserve.server.tls import TlsReloader, certificate_expiry, load_tls

#: the server certificate's notAfter (before 2050: a DER UTCTime; trustme's CAs expire in 3000, a GeneralizedTime)
SERVER_NOT_AFTER = datetime(2031, 5, 17, 12, 30, 45, tzinfo=timezone.utc)
EXPIRY = "ttaserve_tls_certificate_expiry_timestamp_seconds"
RELOADS = "ttaserve_tls_reloads_total"


@dataclass(frozen=True)
class Pki:
    """PEM files: the CA, the server's certificate (localhost and ttaserve.internal, not 127.0.0.1), two client
    certificates the CA signed, and one signed by a CA the server does not trust."""

    ca: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]]


def _write_leaf(leaf: trustme.LeafCert, folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, stranger_ca = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    server_leaf = ca.issue_cert("localhost", "ttaserve.internal", not_after=SERVER_NOT_AFTER)
    server_cert, server_key = _write_leaf(server_leaf, folder, "server")
    clients = {
        name: _write_leaf(ca.issue_cert(f"{name}.fleet.example", common_name=name), folder, name)
        for name in ("camera-1", "camera-2")
    }
    clients["stranger"] = _write_leaf(stranger_ca.issue_cert("stranger.example", common_name="stranger"), folder, "x")
    return Pki(folder / "ca.pem", server_cert, server_key, clients)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("repo")
    write_model_folder(folder, "resnet", cifar_resnet20_config(), {1: seeded_resnet20(0).state_dict()})
    return folder


@pytest.fixture(scope="module", params=["native", "python"])
def tls_server(request: pytest.FixtureRequest, repo: Path, pki: Pki) -> Iterator[ServerHandle]:
    if request.param == "native":
        native_frontend_or_skip()
    handle = start(repo, frontend=request.param, tls_cert=pki.server_cert, tls_key=pki.server_key)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def mtls_server(repo: Path, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    handle = start(
        repo,
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca,
        snapshot_dir=tmp_path_factory.mktemp("snapshots"),
    )
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def plain_server(repo: Path) -> Iterator[ServerHandle]:
    handle = start(repo)
    yield handle
    handle.stop()


def _pixels(count: int = 4) -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)


def _triton_inputs(pixels: np.ndarray, module: object) -> list:
    tensor = module.InferInput("input", list(pixels.shape), "UINT8")  # type: ignore[attr-defined]
    tensor.set_data_from_numpy(pixels)
    return [tensor]


def _grpc_logits(url: str, pixels: np.ndarray, **tls: object) -> np.ndarray:
    with grpcclient.InferenceServerClient(url, **tls) as client:
        result = client.infer("resnet", _triton_inputs(pixels, grpcclient))
    return result.as_numpy("logits")


def _http_logits(url: str, pixels: np.ndarray, context: ssl.SSLContext) -> np.ndarray:
    client = httpclient.InferenceServerClient(url, ssl=True, ssl_context_factory=lambda: context)
    try:
        result = client.infer("resnet", _triton_inputs(pixels, httpclient))
    finally:
        client.close()
    return result.as_numpy("logits")


def _logits(result: BatchResult) -> np.ndarray:
    return np.stack([row.logits for row in result])


def _not_after(pem: bytes) -> float:
    """The first certificate's notAfter, read by ``cryptography`` (not by the code under test)."""
    return x509.load_pem_x509_certificate(pem).not_valid_after_utc.timestamp()


def _expiry(metrics: Metrics, certificate: str) -> float | None:
    return metrics.registry.get_sample_value(EXPIRY, {"certificate": certificate})


def _reloads(metrics: Metrics) -> dict[str, float | None]:
    return {result: metrics.registry.get_sample_value(RELOADS, {"result": result}) for result in ("loaded", "rejected")}


def _client_context(pki: Pki, client: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if client is not None:
        context.load_cert_chain(*pki.clients[client])
    return context


def test_tls_gives_the_plaintext_logits_over_grpc_and_rest(
    tls_server: ServerHandle, plain_server: ServerHandle, pki: Pki
) -> None:
    pixels = _pixels()
    expected = _grpc_logits(f"127.0.0.1:{plain_server.grpc_port}", pixels)
    over_grpc = _grpc_logits(f"localhost:{tls_server.grpc_port}", pixels, ssl=True, root_certificates=str(pki.ca))
    over_rest = _http_logits(f"localhost:{tls_server.http_port}", pixels, _client_context(pki))
    np.testing.assert_array_equal(over_grpc, expected)
    np.testing.assert_array_equal(over_rest, expected)


def test_sdk_verifies_the_server_by_ca_url_scheme_and_server_name(tls_server: ServerHandle, pki: Pki) -> None:
    port = tls_server.grpc_port
    with Client(f"localhost:{port}", tls=True, root_certificates=pki.ca, timeout_s=20) as client:
        by_flag = client.classify(_pixels(2), model="resnet")
    with Client(f"grpcs://localhost:{port}", root_certificates=pki.ca.read_bytes(), timeout_s=20) as client:
        by_scheme = client.classify(_pixels(2), model="resnet")
    # an address the certificate does not name, with the name it does
    with Client(f"127.0.0.1:{port}", root_certificates=pki.ca, server_name="ttaserve.internal") as client:
        renamed = client.classify(_pixels(2), model="resnet")
    for result in (by_scheme, renamed):
        np.testing.assert_array_equal(_logits(result), _logits(by_flag))
    assert all(row.label in CIFAR_LABELS for row in by_flag)


def test_cli_classifies_over_tls(tls_server: ServerHandle, pki: Pki, tmp_path: Path, capsys) -> None:
    from PIL import Image

    image = tmp_path / "frame.png"
    Image.fromarray(_pixels(1)[0]).save(image)
    url = f"localhost:{tls_server.grpc_port}"
    assert cli_main(["classify", "--url", url, "--root-certificates", str(pki.ca), str(image)]) == 0
    assert "frame.png" in capsys.readouterr().out


def test_clients_the_server_cannot_talk_to_are_refused_and_it_keeps_serving(tls_server: ServerHandle, pki: Pki) -> None:
    port = tls_server.grpc_port
    with grpc.insecure_channel(f"localhost:{port}") as channel, pytest.raises(grpc.RpcError) as refused:
        GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    stranger_ca = trustme.CA().cert_pem.bytes()
    # the server's certificate is not from a CA this client trusts
    with Client(f"localhost:{port}", root_certificates=stranger_ca, timeout_s=10) as client, pytest.raises(Unavailable):
        client.classify(_pixels(1), model="resnet")
    with pytest.raises(ssl.SSLCertVerificationError):
        _http_logits(f"localhost:{tls_server.http_port}", _pixels(1), ssl.create_default_context())
    import http.client

    plain = http.client.HTTPConnection("localhost", tls_server.http_port, timeout=10)
    with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):  # plaintext HTTP to the TLS port
        plain.request("GET", "/v2/health/live")
        plain.getresponse().read()
    plain.close()
    with Client(f"localhost:{port}", root_certificates=pki.ca, timeout_s=20) as client:
        assert client.classify(_pixels(1), model="resnet")[0].label in CIFAR_LABELS


def test_mutual_tls_needs_a_client_certificate_from_the_ca(mtls_server: ServerHandle, pki: Pki) -> None:
    url = f"localhost:{mtls_server.grpc_port}"
    for client_files in (None, pki.clients["stranger"]):
        tls = {} if client_files is None else {"certificate_chain": client_files[0], "private_key": client_files[1]}
        with Client(url, root_certificates=pki.ca, timeout_s=10, **tls) as client, pytest.raises(Unavailable):
            client.classify(_pixels(1), model="resnet")
    for refused in (None, "stranger"):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _http_logits(f"localhost:{mtls_server.http_port}", _pixels(1), _client_context(pki, refused))
    cert, key = pki.clients["camera-1"]
    over_grpc = _grpc_logits(
        url, _pixels(), ssl=True, root_certificates=str(pki.ca), private_key=str(key), certificate_chain=str(cert)
    )
    over_rest = _http_logits(f"localhost:{mtls_server.http_port}", _pixels(), _client_context(pki, "camera-1"))
    np.testing.assert_array_equal(over_grpc, over_rest)


def test_async_client_over_mutual_tls(mtls_server: ServerHandle, pki: Pki) -> None:
    cert, key = pki.clients["camera-1"]

    async def run() -> None:
        url = f"grpcs://localhost:{mtls_server.grpc_port}"
        client = AsyncClient(url, root_certificates=pki.ca, certificate_chain=cert, private_key=key)
        async with client, client.session("async", model="resnet", strategy="unmix_tns") as session:
            assert (await session.classify(_pixels(2))).session_steps == 1
            assert (await session.info()).caller == "camera-1"

    asyncio.run(run())


def test_cli_presents_a_client_certificate(mtls_server: ServerHandle, pki: Pki, capsys) -> None:
    cert, key = pki.clients["camera-2"]
    url = f"localhost:{mtls_server.grpc_port}"
    tls = ["--root-certificates", str(pki.ca), "--client-cert", str(cert), "--client-key", str(key)]
    assert cli_main(["models", "--url", url, *tls]) == 0
    assert "resnet" in capsys.readouterr().out
    assert cli_main(["models", "--url", url, "--root-certificates", str(pki.ca), "--timeout", "10"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_mutual_tls_names_callers_by_certificate(mtls_server: ServerHandle, pki: Pki) -> None:
    """Two cameras claiming the same caller header and sequence id get separate sessions named after their
    certificates; a session opened over gRPC continues over REST with the same certificate."""
    url = f"localhost:{mtls_server.grpc_port}"
    pixels = _pixels(8)
    clients = {
        camera: Client(url, root_certificates=pki.ca, certificate_chain=cert, private_key=key, caller="cam")
        for camera, (cert, key) in pki.clients.items()
        if camera != "stranger"
    }
    sessions = [client.session("s1", model="resnet", strategy="unmix_tns") for client in clients.values()]
    try:
        for session in sessions:
            session.classify(pixels[:4])
        for camera, client in clients.items():
            assert [(s.caller, s.steps) for s in client.sessions()] == [(f"{camera}/cam", 1)]
            assert [s.caller for s in client.sessions(all_callers=True)] == [f"{camera}/cam"]
        # camera-2 naming camera-1's caller outright still lands in its own namespace
        cert, key = pki.clients["camera-2"]
        with (
            Client(
                url, root_certificates=pki.ca, certificate_chain=cert, private_key=key, caller="camera-1/cam"
            ) as spy,
            pytest.raises(NotFound, match="no session for caller 'camera-2/camera-1/cam'"),
        ):
            spy.session("s1", model="resnet", strategy="unmix_tns").info()
    finally:
        for session in sessions:
            session.end()
        for client in clients.values():
            client.close()
    # the same stream, opened over gRPC and continued over REST, equals the stream run over gRPC alone
    cert, key = pki.clients["camera-1"]
    with Client(url, root_certificates=pki.ca, certificate_chain=cert, private_key=key) as client:
        with client.session("alone", model="resnet", strategy="unmix_tns") as session:
            session.classify(pixels[:4])
            alone = _logits(session.classify(pixels[4:]))
        with client.session("mixed", model="resnet", strategy="unmix_tns") as session:
            session.classify(pixels[:4])
            rest = httpclient.InferenceServerClient(
                f"localhost:{mtls_server.http_port}",
                ssl=True,
                ssl_context_factory=functools.partial(_client_context, pki, "camera-1"),
            )
            try:
                result = rest.infer(
                    "resnet",
                    _triton_inputs(pixels[4:], httpclient),
                    sequence_id="mixed",
                    parameters={"tta_strategy": "unmix_tns"},
                )
            finally:
                rest.close()
    np.testing.assert_array_equal(result.as_numpy("logits"), alone)


def test_bad_tls_settings_fail_at_start_naming_the_file(pki: Pki, tmp_path: Path) -> None:
    not_pem = tmp_path / "notes.txt"
    not_pem.write_text("hello")
    other_key = pki.clients["camera-1"][1]
    cases = [
        ((pki.server_cert, None, None), "tls_cert and tls_key go together"),
        ((None, None, pki.ca), "tls_client_ca needs tls_cert and tls_key"),
        ((tmp_path / "missing.pem", pki.server_key, None), "missing.pem: cannot read"),
        ((not_pem, pki.server_key, None), "notes.txt: not a PEM file with a CERTIFICATE"),
        ((pki.server_cert, other_key, None), f"tls_key {other_key} does not match tls_cert {pki.server_cert}"),
        ((pki.server_cert, pki.server_key, pki.server_key), "tls_client_ca"),
    ]
    for (cert, key, client_ca), message in cases:
        with pytest.raises(ValueError, match=message.replace(".", r"\.")):
            load_tls(cert, key, client_ca)


def test_serve_refuses_a_mismatched_key_in_one_line(pki: Pki, repo: Path, capsys) -> None:
    other_key = pki.clients["camera-2"][1]
    code = cli_main(
        [
            *("serve", "--model-repository", str(repo), "--grpc-port", "0", "--no-http", "--no-metrics"),
            *("--tls-cert", str(pki.server_cert), "--tls-key", str(other_key)),
        ]
    )
    error = capsys.readouterr().err
    assert code == 1
    assert f"tls_key {other_key} does not match" in error
    assert len(error.strip().splitlines()) == 1


def test_certificate_expiry_is_the_earliest_not_after_in_the_pem() -> None:
    """Leaf certificates count (``ssl.SSLContext.get_ca_certs`` would leave them out), a chain or bundle is as good
    as its first certificate to expire, other PEM blocks are skipped, and both DER time encodings are read."""
    ca = trustme.CA()
    intermediate = ca.create_child_ca()
    soon, later = datetime(2030, 2, 3, 4, 5, 6, tzinfo=timezone.utc), datetime(2071, 1, 1, tzinfo=timezone.utc)
    leaf = intermediate.issue_cert("localhost", not_after=soon)
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    assert len(leaf.cert_chain_pems) == 2 and _not_after(intermediate.cert_pem.bytes()) > soon.timestamp()
    assert certificate_expiry(chain) == soon.timestamp()
    assert certificate_expiry(leaf.private_key_and_cert_chain_pem.bytes()) == soon.timestamp()
    assert certificate_expiry(ca.issue_cert("localhost", not_after=later).cert_chain_pems[0].bytes()) == (
        later.timestamp()
    )
    assert certificate_expiry(ca.cert_pem.bytes()) == _not_after(ca.cert_pem.bytes())
    before_2000 = ca.issue_cert("old", not_before=datetime(1998, 1, 1), not_after=datetime(1999, 12, 31, 23, 59, 59))
    assert certificate_expiry(before_2000.cert_chain_pems[0].bytes()) == 946684799  # UTCTime 99 is 1999
    for broken in (b"no PEM here", b"-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n"):
        with pytest.raises(ValueError):
            certificate_expiry(broken)


def test_tls_servers_export_when_their_certificates_expire(
    tls_server: ServerHandle, mtls_server: ServerHandle, plain_server: ServerHandle, pki: Pki
) -> None:
    """The served chain's expiry and, with mutual TLS, the client CA's; the reload counters at 0 from the start.
    A plaintext server has neither."""
    assert _expiry(tls_server.metrics, "server") == SERVER_NOT_AFTER.timestamp()
    assert _expiry(tls_server.metrics, "client_ca") is None
    assert _expiry(mtls_server.metrics, "server") == SERVER_NOT_AFTER.timestamp()
    assert _expiry(mtls_server.metrics, "client_ca") == _not_after(pki.ca.read_bytes())
    for handle in (tls_server, mtls_server):
        assert _reloads(handle.metrics) == {"loaded": 0, "rejected": 0}
    exported = {family.name for family in plain_server.metrics.registry.collect()}
    assert "ttaserve_server" in exported  # the registry is the one /metrics serves
    assert not {name for name in exported if name.startswith("ttaserve_tls")}


def test_reload_counters_count_each_refusal_once(pki: Pki, tmp_path: Path) -> None:
    """``check`` driven by hand (no watcher thread): a changed set that fails the checks is rejected once however
    often it is read again; files that cannot be read are rejected at every check; an unchanged set is no reload;
    a good set is loaded and its expiry shown."""
    cert, key, ca = tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "ca.crt"
    cert.write_bytes(pki.server_cert.read_bytes())
    key.write_bytes(pki.server_key.read_bytes())
    ca.write_bytes(pki.ca.read_bytes())
    config = load_tls(cert, key, ca)
    assert config is not None
    reloader = TlsReloader(config, interval_s=60)
    metrics = Metrics()
    metrics.watch_tls(reloader)
    rotated = datetime(2033, 3, 3, tzinfo=timezone.utc)
    new_cert, new_key = _write_leaf(trustme.CA().issue_cert("localhost", not_after=rotated), tmp_path, "new")

    os.replace(new_key, key)  # a key that does not match the served certificate
    assert [reloader.check() for _ in range(3)] == [False] * 3
    assert _reloads(metrics) == {"loaded": 0, "rejected": 1}
    cert.rename(tmp_path / "gone.crt")
    assert [reloader.check() for _ in range(2)] == [False] * 2
    assert _reloads(metrics) == {"loaded": 0, "rejected": 3}
    (tmp_path / "gone.crt").rename(cert)  # back as it was: unchanged since the last read, nothing to do
    assert not reloader.check()
    assert _reloads(metrics) == {"loaded": 0, "rejected": 3}
    assert _expiry(metrics, "server") == SERVER_NOT_AFTER.timestamp()

    os.replace(new_cert, cert)
    assert reloader.check()
    assert _reloads(metrics) == {"loaded": 1, "rejected": 3}
    assert _expiry(metrics, "server") == rotated.timestamp()
    assert _expiry(metrics, "client_ca") == _not_after(pki.ca.read_bytes())


def _serves_certificate_of(url: str, ca: bytes) -> bool:
    """Whether a new gRPC connection that trusts only ``ca`` gets through."""
    try:
        with Client(url, root_certificates=ca, timeout_s=5) as client:
            return client.live()
    except Unavailable:
        return False


def _rest_trusts(port: int, ca: bytes) -> bool:
    context = ssl.create_default_context(cadata=ca.decode())
    try:
        with (
            socket.create_connection(("localhost", port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="localhost"),
        ):
            return True
    except ssl.SSLError:
        return False


@pytest.mark.parametrize("frontend", ["native", "python"])
def test_a_rotated_certificate_is_served_without_a_restart(frontend: str, repo: Path, pki: Pki, tmp_path: Path) -> None:
    """The files are replaced as kubelet replaces a Secret's (renamed into place); new connections get the new
    certificate within the reload interval. A broken replacement (a key that does not match) is not taken. The
    metrics count both and show the new certificate's expiry."""
    if frontend == "native":
        native_frontend_or_skip()
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(pki.server_cert.read_bytes())
    key.write_bytes(pki.server_key.read_bytes())
    old_ca, new_ca = pki.ca.read_bytes(), trustme.CA()
    handle = start(repo, frontend=frontend, tls_cert=cert, tls_key=key, tls_reload_interval_s=0.5)
    url = f"localhost:{handle.grpc_port}"
    try:
        assert _serves_certificate_of(url, old_ca) and not _serves_certificate_of(url, new_ca.cert_pem.bytes())
        assert _rest_trusts(handle.http_port, old_ca)
        assert _expiry(handle.metrics, "server") == SERVER_NOT_AFTER.timestamp()
        assert _reloads(handle.metrics) == {"loaded": 0, "rejected": 0}

        rotated = datetime(2032, 7, 8, 9, 10, 11, tzinfo=timezone.utc)
        new_cert, new_key = _write_leaf(new_ca.issue_cert("localhost", not_after=rotated), tmp_path, "new")
        os.replace(new_key, key)  # the key alone: it does not match the served certificate yet
        time.sleep(2.5)
        assert _serves_certificate_of(url, old_ca) and _rest_trusts(handle.http_port, old_ca)
        assert _reloads(handle.metrics) == {"loaded": 0, "rejected": 1}  # once, though read five times
        assert _expiry(handle.metrics, "server") == SERVER_NOT_AFTER.timestamp()
        os.replace(new_cert, cert)
        wait_until(lambda: _serves_certificate_of(url, new_ca.cert_pem.bytes()), 10, "gRPC serving the new one")
        wait_until(lambda: _rest_trusts(handle.http_port, new_ca.cert_pem.bytes()), 10, "REST serving the new one")
        assert not _serves_certificate_of(url, old_ca)
        wait_until(lambda: _reloads(handle.metrics)["loaded"] == 1, 10, "the reload counted")
        assert _reloads(handle.metrics) == {"loaded": 1, "rejected": 1}
        assert _expiry(handle.metrics, "server") == rotated.timestamp()
    finally:
        handle.stop()
