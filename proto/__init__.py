"""Generated protobuf and gRPC stubs for the ttaserve wire protocol (see generate.sh)."""
