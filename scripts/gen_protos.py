"""The one code generator: protos/edgellm/v1/*.proto -> edgellm/v1/*_pb2.py(.pyi) and *_pb2_grpc.py.

The proto package `edgellm.v1` maps onto the Python package `edgellm.v1`, so the
generated imports (`from edgellm.v1 import common_pb2`) resolve without rewriting.
Usage: python scripts/gen_protos.py [--out DIR]   (DIR defaults to the repository root)
"""

import argparse
import pathlib
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"


def generate(out_dir: pathlib.Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "edgellm" / "v1").glob("*.proto"))
    (out_dir / "edgellm" / "v1").mkdir(parents=True, exist_ok=True)
    # grpc_tools ships the well-known protos (not needed yet, but keeps imports of them working).
    well_known = pathlib.Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    init = out_dir / "edgellm" / "v1" / "__init__.py"
    init.write_text('"""Generated gRPC stubs for the edgellm.v1 proto package (scripts/gen_protos.py)."""\n')


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=pathlib.Path, default=ROOT)
    generate(parser.parse_args().out)
