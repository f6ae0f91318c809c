"""Generated Python modules of the KServe v2 gRPC protocol (`inference.GRPCInferenceService`), for the
agent's optional gRPC endpoint (`[serve] grpc_port`; needs grpcio and protobuf, the `agent-grpc` extra).

`grpc_predict_v2.proto` is the source; the two `*_pb2*.py` files are generated from it and committed (a
board needs no compiler). After editing the proto, regenerate them from the repository root with the
grpcio-tools of requirements-ops.lock:

    .venv/bin/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. \\
        runtime_agent/kserve_grpc/grpc_predict_v2.proto

(The path given to protoc becomes the generated import, `from runtime_agent.kserve_grpc import ...`.)
The generated code checks its runtimes: protobuf >= 7.35.1 and grpcio >= 1.85.1.
"""
