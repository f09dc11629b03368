"""Triton's system shared-memory extension, through the real tritonclient and its shared-memory utilities: tensors
that go through /dev/shm give the same answers as tensors in the messages, and every misuse gets a clear status."""

from __future__ import annotations

import asyncio
import io
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.utils.shared_memory as shm
from support import native_frontend_or_skip, start
from tritonclient.utils import InferenceServerException

from ttaserve.client import AsyncClient, Client, TtaserveError
from ttaserve.protocol import grpc_service_pb2_grpc
from ttaserve.protocol import kserve_v2_pb2 as pb
from ttaserve.server.app import ServerHandle
from ttaserve.server.errors import InvalidArgument, ResourceExhausted
from ttaserve.server.shared_memory import SHM_ROOT, SharedMemoryRegion, SharedMemoryRegistry

MODEL = "resnet"
CLASSES = 10

pytestmark = pytest.mark.skipif(not SHM_ROOT.is_dir(), reason=f"needs POSIX shared memory at {SHM_ROOT}")


@pytest.fixture(scope="module", params=["native", "python"])
def shm_server(
    request: pytest.FixtureRequest, model_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerHandle]:
    if request.param == "native":
        native_frontend_or_skip()
    handle = start(
        model_repo,
        metrics_port=None,
        allow_shared_memory=True,
        frontend=request.param,
        snapshot_dir=tmp_path_factory.mktemp("snapshots"),
    )
    yield handle
    handle.stop()


@pytest.fixture
def client(shm_server: ServerHandle) -> Iterator[tc.InferenceServerClient]:
    with tc.InferenceServerClient(f"127.0.0.1:{shm_server.grpc_port}") as connection:
        yield connection
        connection.unregister_system_shared_memory()


@contextmanager
def shm_object(byte_size: int) -> Iterator[tuple[str, shm.SharedMemoryRegion]]:
    """A fresh POSIX shared-memory object (a unique key, so parallel test runs do not meet), destroyed afterwards."""
    key = f"/ttaserve-test-{uuid.uuid4().hex[:12]}"
    handle = shm.create_shared_memory_region(key.lstrip("/"), key, byte_size, create_only=True)
    try:
        yield key, handle
    finally:
        shm.destroy_shared_memory_region(handle)


def assert_status(excinfo: pytest.ExceptionInfo[InferenceServerException], code: str, *fragments: str) -> None:
    assert excinfo.value.status() == f"StatusCode.{code}", excinfo.value
    for fragment in fragments:
        assert fragment in excinfo.value.message(), excinfo.value.message()


def contents(handle: shm.SharedMemoryRegion, datatype: type, shape: list[int], offset: int = 0) -> np.ndarray:
    """A copy: tritonclient returns a view of its mapping, which is gone once the region is destroyed."""
    return np.array(shm.get_contents_as_numpy(handle, datatype, shape, offset=offset), copy=True)


def inline_infer(
    client: tc.InferenceServerClient, images: np.ndarray, *outputs: tc.InferRequestedOutput
) -> tc.InferResult:
    tensor = tc.InferInput("input", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    return client.infer(MODEL, [tensor], outputs=list(outputs))


def shm_input(images: np.ndarray, region: str, offset: int = 0) -> tc.InferInput:
    tensor = tc.InferInput("input", list(images.shape), "UINT8")
    tensor.set_shared_memory(region, images.nbytes, offset=offset)
    return tensor


def shm_output(
    name: str, region: str, byte_size: int, offset: int = 0, class_count: int = 0
) -> tc.InferRequestedOutput:
    output = tc.InferRequestedOutput(name, class_count=class_count)
    output.set_shared_memory(region, byte_size, offset=offset)
    return output


def test_tensors_through_shared_memory_give_the_inline_answers(
    client: tc.InferenceServerClient, real_images: np.ndarray
) -> None:
    images = real_images[:16]
    header = 100  # the input sits after a header the camera process keeps in the same object
    with shm_object(header + images.nbytes) as (in_key, in_handle), shm_object(8192) as (out_key, out_handle):
        shm.set_shared_memory_region(in_handle, [images], offset=header)
        client.register_system_shared_memory("frames", in_key, header + images.nbytes)
        client.register_system_shared_memory("answers", out_key, 8192)
        logits_bytes = len(images) * CLASSES * 4
        result = client.infer(
            MODEL,
            [shm_input(images, "frames", offset=header)],
            outputs=[
                shm_output("logits", "answers", logits_bytes),
                shm_output("topk_labels", "answers", 8192 - logits_bytes - 1000, offset=logits_bytes),
                tc.InferRequestedOutput("topk_indices"),
                shm_output("probabilities", "answers", 1000, offset=8192 - 1000),
            ],
        )
        expected = inline_infer(
            client,
            images,
            tc.InferRequestedOutput("logits"),
            tc.InferRequestedOutput("topk_labels"),
            tc.InferRequestedOutput("probabilities"),
        )
        logits = contents(out_handle, np.float32, [len(images), CLASSES])
        labels = contents(out_handle, np.object_, [len(images), 5], offset=logits_bytes)
        probabilities = contents(out_handle, np.float32, [len(images), CLASSES], offset=8192 - 1000)

    np.testing.assert_array_equal(logits, expected.as_numpy("logits"))
    np.testing.assert_array_equal(labels, expected.as_numpy("topk_labels"))
    np.testing.assert_array_equal(probabilities, expected.as_numpy("probabilities"))
    # an output not in shared memory still travels in the message, at its own index
    np.testing.assert_array_equal(result.as_numpy("topk_indices")[:, 0], expected.as_numpy("logits").argmax(axis=1))
    written = result.get_output("logits")
    assert written.parameters["shared_memory_region"].string_param == "answers"
    assert written.parameters["shared_memory_byte_size"].int64_param == logits_bytes
    assert result.get_output("topk_labels").parameters["shared_memory_offset"].int64_param == logits_bytes


def test_status_lists_regions_and_unregister_forgets_them(client: tc.InferenceServerClient) -> None:
    with shm_object(4096) as (key, _handle):
        client.register_system_shared_memory("a", key, 1024)
        client.register_system_shared_memory("b", key, 2048, offset=2048)
        regions = client.get_system_shared_memory_status().regions
        assert {name: (r.key, r.offset, r.byte_size) for name, r in regions.items()} == {
            "a": (key, 0, 1024),
            "b": (key, 2048, 2048),
        }
        assert list(client.get_system_shared_memory_status("b").regions) == ["b"]
        client.unregister_system_shared_memory("a")
        client.unregister_system_shared_memory("a")  # unknown names are no error, as in Triton
        assert list(client.get_system_shared_memory_status().regions) == ["b"]
        with pytest.raises(InferenceServerException) as excinfo:
            client.get_system_shared_memory_status("a")
        assert_status(excinfo, "NOT_FOUND", "'a' is not registered", "registered: b")
        client.unregister_system_shared_memory()
        assert not client.get_system_shared_memory_status().regions


@pytest.mark.parametrize(
    ("name", "key", "offset", "byte_size", "code", "fragment"),
    [
        ("r", "/ttaserve-test-absent", 0, 16, "NOT_FOUND", "no shared-memory object '/ttaserve-test-absent'"),
        ("r", "/../etc/passwd", 0, 16, "INVALID_ARGUMENT", "is not a shared-memory object name"),
        ("r", "/", 0, 16, "INVALID_ARGUMENT", "is not a shared-memory object name"),
        ("r", "KEY", 4000, 200, "INVALID_ARGUMENT", "offset 4000 + byte_size 200 is beyond the 4096 bytes"),
        ("r", "KEY", 0, 0, "INVALID_ARGUMENT", "byte_size must be positive"),
        ("", "KEY", 0, 16, "INVALID_ARGUMENT", "'name' is empty"),
    ],
)
def test_bad_registrations_are_refused(
    client: tc.InferenceServerClient, name: str, key: str, offset: int, byte_size: int, code: str, fragment: str
) -> None:
    with shm_object(4096) as (real_key, _handle), pytest.raises(InferenceServerException) as excinfo:
        client.register_system_shared_memory(name, real_key if key == "KEY" else key, byte_size, offset=offset)
    assert_status(excinfo, code, fragment)
    assert not client.get_system_shared_memory_status().regions


def test_a_name_is_registered_once_and_links_are_not_followed(client: tc.InferenceServerClient) -> None:
    link = SHM_ROOT / f"ttaserve-test-link-{uuid.uuid4().hex[:8]}"
    with shm_object(64) as (key, _handle):
        client.register_system_shared_memory("r", key, 64)
        with pytest.raises(InferenceServerException) as excinfo:
            client.register_system_shared_memory("r", key, 32)
        assert_status(excinfo, "ALREADY_EXISTS", "'r' is already registered")
        link.symlink_to(SHM_ROOT / key.lstrip("/"))
        try:
            with pytest.raises(InferenceServerException) as excinfo:
                client.register_system_shared_memory("via-link", "/" + link.name, 32)
        finally:
            link.unlink()
    assert_status(excinfo, "INVALID_ARGUMENT", "cannot open key")


def test_bad_shared_memory_requests_are_refused_and_the_server_keeps_serving(
    client: tc.InferenceServerClient, real_images: np.ndarray
) -> None:
    images = real_images[:4]
    with shm_object(images.nbytes) as (key, handle):
        shm.set_shared_memory_region(handle, [images])
        client.register_system_shared_memory("frames", key, images.nbytes)
        cases = [
            ([shm_input(images, "nope")], [], "NOT_FOUND", "'nope' is not registered"),
            ([shm_input(images, "frames", offset=8)], [], "INVALID_ARGUMENT", "lie outside shared-memory region"),
            (
                [shm_input(images, "frames")],
                [shm_output("logits", "frames", 100)],
                "INVALID_ARGUMENT",
                "output 'logits': needs up to 160 bytes",
            ),
        ]
        short = tc.InferInput("input", list(images.shape), "UINT8")
        short.set_shared_memory("frames", images.nbytes // 2)
        cases.append(([short], [], "INVALID_ARGUMENT", f"needs {images.nbytes} bytes, got {images.nbytes // 2}"))
        half = tc.InferInput("input", list(images.shape), "UINT8")
        half.set_shared_memory("frames", images.nbytes)
        del half._get_tensor().parameters["shared_memory_byte_size"]
        cases.append(
            ([half], [], "INVALID_ARGUMENT", "needs both 'shared_memory_region' and 'shared_memory_byte_size'")
        )
        for inputs, outputs, code, fragment in cases:
            with pytest.raises(InferenceServerException) as excinfo:
                client.infer(MODEL, inputs, outputs=outputs or None)
            assert_status(excinfo, code, fragment)
        np.testing.assert_array_equal(
            client.infer(MODEL, [shm_input(images, "frames")]).as_numpy("logits"),
            inline_infer(client, images, tc.InferRequestedOutput("logits")).as_numpy("logits"),
        )


def test_an_object_truncated_after_registration_is_an_error_not_a_crash(
    client: tc.InferenceServerClient, real_images: np.ndarray
) -> None:
    """Reading a mapping past the end of its object raises SIGBUS; the server reads with pread and says what went
    wrong instead."""
    images = real_images[:4]
    with shm_object(images.nbytes) as (key, handle):
        shm.set_shared_memory_region(handle, [images])
        client.register_system_shared_memory("frames", key, images.nbytes)
        os.truncate(SHM_ROOT / key.lstrip("/"), images.nbytes // 3)
        with pytest.raises(InferenceServerException) as excinfo:
            client.infer(MODEL, [shm_input(images, "frames")])
        assert_status(excinfo, "INVALID_ARGUMENT", f"ends before byte {images.nbytes // 3}")
        assert inline_infer(client, images, tc.InferRequestedOutput("logits")).as_numpy("logits").shape == (4, CLASSES)


def test_data_both_inline_and_in_shared_memory_is_refused(shm_server: ServerHandle, real_images: np.ndarray) -> None:
    images = real_images[:2]
    with (
        shm_object(images.nbytes) as (key, _handle),
        grpc.insecure_channel(f"127.0.0.1:{shm_server.grpc_port}") as channel,
    ):
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        stub.SystemSharedMemoryRegister(
            pb.SystemSharedMemoryRegisterRequest(name="both", key=key, byte_size=images.nbytes)
        )
        try:
            message = pb.ModelInferRequest(model_name=MODEL)
            tensor = message.inputs.add(name="input", datatype="UINT8", shape=list(images.shape))
            tensor.parameters["shared_memory_region"].string_param = "both"
            tensor.parameters["shared_memory_byte_size"].int64_param = images.nbytes
            message.raw_input_contents.append(images.tobytes())
            with pytest.raises(grpc.RpcError) as excinfo:
                stub.ModelInfer(message)
            assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "both in shared memory and in the request" in excinfo.value.details()
            del message.raw_input_contents[:]
            tensor.parameters["shared_memory_region"].int64_param = 3
            with pytest.raises(grpc.RpcError) as excinfo:
                stub.ModelInfer(message)
            assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "'shared_memory_region' must be a string" in excinfo.value.details()
            tensor.parameters["shared_memory_region"].string_param = "both"
            output = message.outputs.add(name="logits")
            output.parameters["classification"].int64_param = 2
            output.parameters["shared_memory_region"].string_param = "both"
            output.parameters["shared_memory_byte_size"].int64_param = images.nbytes
            with pytest.raises(grpc.RpcError) as excinfo:
                stub.ModelInfer(message)
            assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "a classification output cannot go to shared memory" in excinfo.value.details()
        finally:
            stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest())


def test_an_output_that_cannot_be_delivered_does_not_step_the_session(
    client: tc.InferenceServerClient, real_images: np.ndarray
) -> None:
    images = real_images[:8]
    params = {"tta_strategy": "tbn"}
    with shm_object(4096) as (key, _handle):
        client.register_system_shared_memory("answers", key, 4096)

        def step(byte_size: int, start: bool = False) -> tc.InferResult:
            tensor = tc.InferInput("input", list(images.shape), "UINT8")
            tensor.set_data_from_numpy(images)
            return client.infer(
                MODEL,
                [tensor],
                outputs=[shm_output("logits", "answers", byte_size)],
                sequence_id="shm-cam",
                sequence_start=start,
                parameters=params,
            )

        assert step(4096, start=True).get_response().parameters["tta_session_steps"].int64_param == 1
        with pytest.raises(InferenceServerException) as excinfo:
            step(8 * CLASSES * 4 - 1)
        assert_status(excinfo, "INVALID_ARGUMENT", "needs up to 320 bytes")
        assert step(4096).get_response().parameters["tta_session_steps"].int64_param == 2


@pytest.mark.skipif(os.geteuid() == 0, reason="root opens any object read-write, so no region can be read-only")
def test_a_read_only_object_carries_inputs_but_not_outputs(
    client: tc.InferenceServerClient, real_images: np.ndarray
) -> None:
    images = real_images[:2]
    with shm_object(images.nbytes) as (key, handle):
        shm.set_shared_memory_region(handle, [images])
        (SHM_ROOT / key.lstrip("/")).chmod(0o444)
        client.register_system_shared_memory("ro", key, images.nbytes)
        assert client.infer(MODEL, [shm_input(images, "ro")]).as_numpy("logits").shape == (2, CLASSES)
        with pytest.raises(InferenceServerException) as excinfo:
            client.infer(MODEL, [shm_input(images, "ro")], outputs=[shm_output("topk_indices", "ro", 80)])
    assert_status(excinfo, "INVALID_ARGUMENT", "is mapped read-only")


def test_without_the_setting_shared_memory_is_unimplemented(url: str, real_images: np.ndarray) -> None:
    """The session server runs with the default settings: shared memory off."""
    with tc.InferenceServerClient(url) as client, shm_object(64) as (key, _handle):
        assert "system_shared_memory" not in client.get_server_metadata().extensions
        for call in (
            lambda: client.register_system_shared_memory("r", key, 64),
            lambda: client.get_system_shared_memory_status(),
            lambda: client.infer(MODEL, [shm_input(real_images[:1], "r")]),
        ):
            with pytest.raises(InferenceServerException) as excinfo:
                call()
            assert_status(excinfo, "UNIMPLEMENTED", "--allow-shared-memory")
        with pytest.raises(InferenceServerException) as excinfo:
            client.get_cuda_shared_memory_status()
        assert_status(excinfo, "UNIMPLEMENTED", "CUDA shared memory is not supported")


def test_a_request_keeps_its_region_after_it_is_unregistered(tmp_path: Path) -> None:
    """A request resolves its region once; unregistering it meanwhile leaves that request a valid mapping."""
    (tmp_path / "obj").write_bytes(bytes(range(256)))
    registry = SharedMemoryRegistry(enabled=True, root=tmp_path)
    registry.register("r", "/obj", 16, 64)
    params = pb.ModelInferRequest.InferInputTensor().parameters
    params["shared_memory_region"].string_param = "r"
    params["shared_memory_byte_size"].int64_param = 8
    params["shared_memory_offset"].int64_param = 4
    located = registry.locate(params, "input 'x'")
    registry.unregister("")
    assert bytes(located.read("input 'x'")) == bytes(range(20, 28))
    located.write(b"\xff" * 8, "output 'y'")
    assert (tmp_path / "obj").read_bytes()[20:28] == b"\xff" * 8
    with pytest.raises(InvalidArgument, match="needs 9 bytes, shared_memory_byte_size gives 8"):
        located.write(b"\x00" * 9, "output 'y'")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (every write to it fails with ENOSPC)")
def test_a_full_object_is_resource_exhausted() -> None:
    """Writing into an object whose memory cannot be allocated (a full /dev/shm) is an error naming the object."""
    region = SharedMemoryRegion("r", "/full", 0, 16, True, io.FileIO("/dev/full", "r+"))
    with pytest.raises(ResourceExhausted, match="output 'logits': shared-memory object '/full': No space left"):
        region.write(0, b"\x01" * 8, "output 'logits'")


def client_objects() -> set[str]:
    """The shared-memory objects SDK clients of this process created."""
    return {path.name for path in SHM_ROOT.glob(f"ttaserve-{os.getpid()}-*")}


def test_the_sdk_passes_batches_through_shared_memory(shm_server: ServerHandle, real_images: np.ndarray) -> None:
    url = f"127.0.0.1:{shm_server.grpc_port}"
    batches = [real_images[i * 8 : (i + 1) * 8] for i in range(8)]
    with Client(url) as plain:
        expected = [np.stack([c.logits for c in plain.classify(b, model=MODEL)]) for b in batches]
    with Client(url, shared_memory=True) as client, tc.InferenceServerClient(url) as triton:
        with ThreadPoolExecutor(4) as pool:  # one client shared by threads: each request gets a slot of its own
            results = list(pool.map(lambda b: client.classify(b, model=MODEL), batches * 3))
        for index, result in enumerate(results):
            np.testing.assert_array_equal(np.stack([c.logits for c in result]), expected[index % len(batches)])
        regions = triton.get_system_shared_memory_status().regions
        assert 1 <= len(regions) <= 4
        assert client_objects() == {name.lstrip("/") for name in (r.key for r in regions.values())}
    with tc.InferenceServerClient(url) as triton:
        assert not triton.get_system_shared_memory_status().regions
    assert not client_objects()


def test_the_async_sdk_passes_batches_through_shared_memory(shm_server: ServerHandle, real_images: np.ndarray) -> None:
    url = f"127.0.0.1:{shm_server.grpc_port}"
    images = real_images[:8]
    with Client(url) as plain:
        expected = np.stack([c.logits for c in plain.classify(images, model=MODEL)])

    async def classify() -> np.ndarray:
        async with AsyncClient(url, shared_memory=True) as client:
            first = await client.classify(images, model=MODEL)
            second = await client.classify(images, model=MODEL)  # the same slot, registered once
            assert len(client_objects()) == 1
        return np.stack([np.stack([c.logits for c in r]) for r in (first, second)])

    np.testing.assert_array_equal(asyncio.run(classify()), np.stack([expected, expected]))
    assert not client_objects()


def test_the_sdk_says_when_the_server_has_no_shared_memory(url: str, real_images: np.ndarray) -> None:
    with Client(url, shared_memory=True) as client:
        with pytest.raises(TtaserveError) as excinfo:
            client.classify(real_images[:2], model=MODEL)
        assert excinfo.value.code == "UNIMPLEMENTED"
        assert "--allow-shared-memory" in excinfo.value.message
        assert not client_objects()  # the refused object is removed at once


def test_the_cli_classifies_through_shared_memory(
    shm_server: ServerHandle, url: str, real_images: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``ttaserve classify --shared-memory`` prints the table it prints without the flag; against a server without
    the extension it fails in one line naming the server flag, and leaves no object behind."""
    from PIL import Image

    from ttaserve.client import cli

    files = []
    for index, image in enumerate(real_images[:3]):
        files.append(str(tmp_path / f"frame{index}.png"))
        Image.fromarray(image).save(files[-1])
    shm_url = f"127.0.0.1:{shm_server.grpc_port}"
    assert cli.main(["classify", "--url", shm_url, "--model", MODEL, *files]) == 0
    plain = capsys.readouterr().out
    assert cli.main(["classify", "--url", shm_url, "--model", MODEL, "--shared-memory", *files]) == 0
    assert capsys.readouterr().out == plain and "frame2.png" in plain
    assert not client_objects()
    assert cli.main(["classify", "--url", url, "--model", MODEL, "--shared-memory", *files]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "UNIMPLEMENTED" in error and "--allow-shared-memory" in error
    assert not client_objects()
