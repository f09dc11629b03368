"""What deploy/docker/check.sh asks of a running image: real Fashion-MNIST test images classified by the embedded
default model, an UnMix-TNS session that steps, a bad request refused with its status, the same predictions over
the REST protocol, and the server running its prebuilt native gRPC front end and C kernels (its
``ttaserve_server_info`` metric).

    python deploy/docker/smoke.py HOST:GRPC_PORT http://HOST:METRICS_PORT/metrics http://HOST:HTTP_PORT
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request

import numpy as np

from ttaserve.client import Client
from ttaserve.client.errors import InvalidArgument, TtaserveError
from ttaserve.server.fashion_mnist import load_split

IMAGES = 500
#: docs/default_model.md gives 91.28 % on all 10,000 test images; 500 of them scatter by about ±1.3 %
MIN_ACCURACY = 0.87


def wait_ready(client: Client, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if client.ready():
                return
        except TtaserveError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"the server in the image was not ready within {seconds:.0f} s")
        time.sleep(0.5)


def rest_predictions(http_url: str, images: np.ndarray) -> np.ndarray:
    """The top class of each image, asked over the v2 REST protocol with the pixels in JSON (curl's way)."""
    body = {
        "inputs": [
            {"name": "input", "datatype": "UINT8", "shape": list(images.shape), "data": images.ravel().tolist()}
        ],
        "outputs": [{"name": "topk_indices"}],
        "parameters": {"top_k": 1},
    }
    request = urllib.request.Request(f"{http_url}/v2/models/fashion_mnist/infer", data=json.dumps(body).encode())
    answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
    return np.array(answer["outputs"][0]["data"])


def main(url: str, metrics_url: str, http_url: str) -> None:
    images, labels = load_split("test")
    images, labels = images[:IMAGES, :, :, None], labels[:IMAGES]
    with Client(url) as client:
        wait_ready(client)
        batches = [client.classify(images[i : i + 100]) for i in range(0, IMAGES, 100)]
        predicted = np.array([r.index for batch in batches for r in batch])
        accuracy = float((predicted == labels).mean())
        print(f"source model: {accuracy:.2%} of {IMAGES} Fashion-MNIST test images")
        assert accuracy >= MIN_ACCURACY, f"accuracy {accuracy:.2%} < {MIN_ACCURACY:.0%}"
        over_rest = rest_predictions(http_url, images[:100])
        assert (over_rest == predicted[:100]).all(), "REST and gRPC disagree"
        print("REST: the same 100 predictions as gRPC")
        with client.session("camera-1", strategy="unmix_tns") as stream:
            for i in range(0, 64, 16):
                result = stream.classify(images[i : i + 16])
            assert result.session_steps == 4, result.session_steps
            print(f"unmix_tns session: 4 steps, last batch entropy {result.stats['entropy']:.3f}")
        try:
            client.classify(np.zeros((2, 27, 28, 1), np.uint8))
        except InvalidArgument as exc:
            print(f"bad shape refused: {exc}")
        else:
            raise AssertionError("a 27x28 image was accepted")
    metrics = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    (info,) = [line for line in metrics.splitlines() if line.startswith("ttaserve_server_info{")]
    print(info)
    assert 'frontend="native"' in info and 'native_kernels="loaded"' in info, info


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
