"""pdserve's public gRPC API: stubs generated from proto/pdserve.proto (see regenerate.py)."""
