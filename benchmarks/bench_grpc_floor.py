"""The floor under any Python v2 server: ``tritonclient``'s ModelInfer against a Python gRPC server that answers
with a canned response and does no work at all. Whatever a real server adds on top of its model's forward, it
cannot go below this round trip on the same machine.

    python benchmarks/bench_grpc_floor.py [--requests 3000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import numpy as np
import tritonclient.grpc as tc

SERVER = """
import sys, time
from concurrent import futures
import grpc, numpy as np
from ttaserve.protocol import grpc_service_pb2_grpc as g, kserve_v2_pb2 as pb
response = pb.ModelInferResponse(model_name="m", model_version="1")
response.outputs.add(name="logits", datatype="FP32", shape=[1, 10])
response.raw_output_contents.append(np.zeros((1, 10), np.float32).tobytes())
class Canned(g.GRPCInferenceServiceServicer):
    def ModelInfer(self, request, context):
        return response
    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
g.add_GRPCInferenceServiceServicer_to_server(Canned(), server)
print(server.add_insecure_port("127.0.0.1:0"), flush=True)
server.start()
time.sleep(float(sys.argv[1]))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    process = subprocess.Popen([sys.executable, "-c", SERVER, "600"], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        client = tc.InferenceServerClient(f"127.0.0.1:{process.stdout.readline().strip()}")
        pixels = np.zeros((1, 32, 32, 3), np.uint8)
        outputs = [tc.InferRequestedOutput("logits")]

        def call() -> None:
            tensor = tc.InferInput("input", [1, 32, 32, 3], "UINT8")
            tensor.set_data_from_numpy(pixels)
            client.infer("m", [tensor], outputs=outputs).as_numpy("logits")

        for _ in range(300):
            call()
        latencies = []
        for _ in range(args.requests):
            start = time.perf_counter()
            call()
            latencies.append((time.perf_counter() - start) * 1000)
        print(
            f"tritonclient ModelInfer (1x32x32x3 UINT8) against a canned Python gRPC server: "
            f"p50 {np.percentile(latencies, 50):.3f} ms, p99 {np.percentile(latencies, 99):.3f} ms "
            f"over {args.requests} requests"
        )
    finally:
        process.kill()


if __name__ == "__main__":
    main()
