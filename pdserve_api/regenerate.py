"""Regenerate the checked-in gRPC stubs from proto/pdserve.proto.

    python -m pdserve_api.regenerate          # rewrite pdserve_api/pdserve_pb2*.py(i)

The package is `pdserve_api`, not `proto`: protobuf's ecosystem already owns the top-level
import name `proto` (proto-plus), and generated code must import itself by package path.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO = REPO / "proto" / "pdserve.proto"
PACKAGE = "pdserve_api"
GENERATED = ("pdserve_pb2.py", "pdserve_pb2.pyi", "pdserve_pb2_grpc.py")


def generate(out_root: Path) -> Path:
    """Write the stubs under out_root/pdserve_api/; returns that folder."""
    # Lazy: grpcio-tools is a development dependency (the dev extra); the package that ships
    # this module must import without it.
    from grpc_tools import protoc

    out_root.mkdir(parents=True, exist_ok=True)
    # -I<virtual>=<dir> makes the generated modules import each other as pdserve_api.*
    args = ["protoc", f"-I{PACKAGE}={PROTO.parent}", f"--python_out={out_root}",
            f"--pyi_out={out_root}", f"--grpc_python_out={out_root}", f"{PACKAGE}/{PROTO.name}"]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    return out_root / PACKAGE


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = generate(Path(tmp))
        for name in GENERATED:
            (REPO / PACKAGE / name).write_bytes((out / name).read_bytes())
    print(f"regenerated {', '.join(GENERATED)} from {PROTO.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
