"""Who may call moemesh's internal gRPC servers: a shared cluster token on every call, and optional TLS.

`GrpcSecurity` is what a server and its clients agree on; the builder makes one per deployment (the token generated
with `secrets.token_urlsafe` unless configured) and hands it through Ray to every shard and attention worker.

- Token: clients pass `metadata=security.metadata` (`authorization: Bearer <token>`) on every call (explicitly: a
  client interceptor would cost ~50 us per call, on the critical path of every MoE layer); servers check it in
  `TokenInterceptor` before any method runs, comparing SHA-256 digests with `hmac.compare_digest`, and answer
  UNAUTHENTICATED without parsing the request.
- TLS (`TlsFiles`): servers present `cert_file`/`key_file`; clients verify them against `ca_file` (and against
  `server_name` instead of the dialled address when set, so one certificate can serve every node). With `mutual`,
  servers also require a client certificate signed by `ca_file`, and clients present `cert_file`/`key_file`.

The token is never part of a repr, a log line or an error message.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

METADATA_KEY = "authorization"  # gRPC metadata keys are lower case
UNAUTHENTICATED_DETAILS = "missing or wrong cluster token"


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for TLS on internal gRPC. They are read when a server or channel is made, in that process, so each
    node may hold its own files at the same paths."""

    cert_file: str
    key_file: str
    ca_file: str
    mutual: bool = False
    server_name: str | None = None

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(_read(self.key_file), _read(self.cert_file))],
                                           root_certificates=_read(self.ca_file) if self.mutual else None,
                                           require_client_auth=self.mutual)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        if not self.mutual:
            return grpc.ssl_channel_credentials(root_certificates=_read(self.ca_file))
        return grpc.ssl_channel_credentials(root_certificates=_read(self.ca_file), private_key=_read(self.key_file),
                                            certificate_chain=_read(self.cert_file))


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"grpc_tls: cannot read {path!r}: {e.strerror}") from None


@dataclass(frozen=True)
class GrpcSecurity:
    """The cluster token (None: calls are not authenticated) and TLS files (None: plaintext) of internal gRPC.
    The default is neither: what single-process tests and benchmarks use."""

    token: str | None = field(default=None, repr=False)
    tls: TlsFiles | None = None

    def __post_init__(self):
        if self.token is not None and (not self.token or not self.token.isprintable() or " " in self.token):
            raise ValueError("token: must be a non-empty printable string without spaces")

    def server(self, options: Sequence[tuple[str, int]] = ()) -> grpc.aio.Server:
        """A `grpc.aio` server that refuses calls without the token (when there is one)."""
        interceptors = [TokenInterceptor(self.token)] if self.token is not None else []
        return grpc.aio.server(options=list(options), interceptors=interceptors)

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        """Listen on `address` (`host:port`, port 0 = any free one), with TLS when configured; -> the bound port."""
        if self.tls is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, self.tls.server_credentials())

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """What every call passes as `metadata=`: the token (None without one)."""
        return None if self.token is None else ((METADATA_KEY, f"Bearer {self.token}"),)

    def channel(self, address: str, options: Sequence[tuple[str, int | str]] = ()) -> grpc.aio.Channel:
        """A `grpc.aio` channel to `address`, TLS when configured. Calls on it pass `metadata=self.metadata`."""
        options = list(options)
        if self.tls is None:
            return grpc.aio.insecure_channel(address, options=options)
        if self.tls.server_name:
            options.append(("grpc.ssl_target_name_override", self.tls.server_name))
        return grpc.aio.secure_channel(address, self.tls.channel_credentials(), options=options)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through only if it carries exactly one `authorization: Bearer <token>`; any other call is
    answered UNAUTHENTICATED before its handler is looked up or its request parsed. The comparison is over SHA-256
    digests (fixed length) with `hmac.compare_digest` (constant time)."""

    def __init__(self, token: str):
        self._expected = _digest(f"Bearer {token}")
        self._deny = grpc.unary_unary_rpc_method_handler(_unauthenticated)

    def allows(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        values = [value for key, value in (metadata or ()) if key == METADATA_KEY]
        if len(values) != 1 or not isinstance(values[0], str):
            return False
        return hmac.compare_digest(_digest(values[0]), self._expected)

    async def intercept_service(self, continuation, handler_call_details):
        if self.allows(handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        return self._deny


async def _unauthenticated(request, context) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_DETAILS)
