"""The real CIFAR-10 ResNet-20 served over gRPC reproduces its published accuracy on the real test set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tritonclient.grpc as tc
from support import RESNET20, cifar_resnet20_config, requires_shared, start, write_model

from ttaserve.server.architectures import load_state_dict


@requires_shared
def test_resnet20_scores_91_73_over_grpc(tmp_path: Path, cifar_test: tuple[np.ndarray, np.ndarray]) -> None:
    write_model(tmp_path, "cifar10_resnet20", cifar_resnet20_config(), {1: load_state_dict(RESNET20)})
    handle = start(tmp_path, metrics_port=None)
    try:
        client = tc.InferenceServerClient(f"127.0.0.1:{handle.grpc_port}")
        images, labels = cifar_test
        correct = 0
        for start_row in range(0, len(images), 250):
            batch = images[start_row : start_row + 250]
            tensor = tc.InferInput("input", list(batch.shape), "UINT8")
            tensor.set_data_from_numpy(batch)
            result = client.infer("cifar10_resnet20", [tensor], outputs=[tc.InferRequestedOutput("topk_indices")])
            correct += int((result.as_numpy("topk_indices")[:, 0] == labels[start_row : start_row + 250]).sum())
        accuracy = 100.0 * correct / len(images)
        print(f"ResNet-20 over gRPC: {accuracy:.2f} % top-1 on {len(images)} CIFAR-10 test images")
        assert abs(accuracy - 91.73) <= 0.05
    finally:
        handle.stop()
