"""Generated gRPC stubs for the edgellm.v1 proto package (scripts/gen_protos.py)."""
