"""The agent's network endpoints: KServe v2 over REST (always, with `/metrics`) and over gRPC (with
`[serve] grpc_port`), sharing one `ServingMetrics`.

Both are bound before either starts, so a port another process holds is a one-line error saying which
key of agent.toml to change (two device folders on one host each need their own ports), and nothing is
left serving. gRPC needs grpcio and protobuf; an agent without them serves REST as ever and refuses only
a `grpc_port`, with one line naming the install.
"""

from __future__ import annotations

import errno
from typing import Any, Callable

from runtime_agent.config import AgentConfig
from runtime_agent.errors import AgentError
from runtime_agent.metrics import ServingMetrics
from runtime_agent.server import InferenceServer, Servable

GRPC_INSTALL = "pip install 'edge-toolchain[agent-grpc]' (grpcio>=1.85.1 and protobuf>=7.35.1)"


def _grpc_server_class() -> type:
    try:
        from runtime_agent.grpc_server import GrpcServer
    except (ImportError, RuntimeError) as exc:  # missing, or older than the generated stubs need
        reason = f"{exc.name} is not installed" if isinstance(exc, ImportError) and exc.name else str(exc).split(".")[0]
        raise AgentError(f"[serve] grpc_port needs the agent's gRPC extra ({reason}): {GRPC_INSTALL}") from None
    return GrpcServer


def _bind(config: AgentConfig, key: str, port: int, make: Callable[[], Any]) -> Any:
    try:
        return make()
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        raise AgentError(f"port {port} on {config.serve_host} is already in use (another agent?); "
                         f"set another in [serve] {key} of {config.device_dir / 'agent.toml'}") from None


def start_endpoints(servable: Servable, config: AgentConfig) -> list[Any]:
    """The REST server (first: its `port` is the one announced) and the gRPC one if configured, started;
    each has `stop()`."""
    metrics = ServingMetrics()
    grpc_server = _grpc_server_class() if config.grpc_port is not None else None
    rest = _bind(config, "port", config.serve_port, lambda: InferenceServer(servable, config.serve_host, config.serve_port, metrics,
                                                                           config.serve_limits))
    servers = [rest]
    if grpc_server is not None:
        try:
            servers.append(_bind(config, "grpc_port", config.grpc_port,
                                 lambda: grpc_server(servable, config.serve_host, config.grpc_port, metrics)))
        except AgentError:
            rest.server_close()
            raise
    return [server.start() for server in servers]
