"""Internal gRPC security on real grpc.aio servers (127.0.0.1, port 0): the cluster token (missing, wrong, doubled or
right; refused before the method or its request is looked at), TLS with a CA and certificates made here with
`cryptography` (server-only and mutual; a client without the CA, without TLS, or without a client certificate
cannot connect), and both transports carrying token and TLS to real expert and Engram shards."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from moemesh.actors.engram.client import GrpcEngramTransport
from moemesh.actors.engram.server import serve_engram_shard
from moemesh.actors.experts.server import serve_expert_shard
from moemesh.proto import errors, health_pb2, health_pb2_grpc
from moemesh.proto.auth import UNAUTHENTICATED_DETAILS, GrpcSecurity, TlsFiles
from moemesh.proto.codec import TokenBatch
from moemesh.proto.transport import GrpcTransport

pytestmark = [pytest.mark.timeout(60), pytest.mark.filterwarnings("ignore:The given buffer is not writable")]
TOKEN = "cluster-token-0123456789abcdef"


# ---- a throwaway PKI ------------------------------------------------------------------------------------------------
def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key, issuer_name: x509.Name, issuer_key, *, ca: bool = False, dns: tuple[str, ...] = (),
          ips: tuple[str, ...] = ()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    names = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, *objects) -> str:
    pem = b""
    for obj in objects:
        if isinstance(obj, x509.Certificate):
            pem += obj.public_bytes(serialization.Encoding.PEM)
        else:
            pem += obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
    path.write_bytes(pem)
    return str(path)


def _pki(directory: Path, name: str, **sans) -> tuple[str, str, str]:
    """A CA and one certificate it signed (usable by servers and clients alike): (cert, key, ca) file paths."""
    ca_key, key = _key(), _key()
    ca_cert = _cert(f"{name} CA", ca_key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")]),
                    ca_key, ca=True)
    cert = _cert(name, key, ca_cert.subject, ca_key, **sans)
    return (_write(directory / f"{name}.crt", cert), _write(directory / f"{name}.key", key),
            _write(directory / f"{name}-ca.crt", ca_cert))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    return {"node": _pki(d, "node", dns=("localhost",), ips=("127.0.0.1",)),
            "other": _pki(d, "other", dns=("localhost",), ips=("127.0.0.1",)),
            "named": _pki(d, "named", dns=("moemesh.internal",))}


# ---- a server with the Health service -------------------------------------------------------------------------------
class _Ok:
    async def Check(self, request, context):
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING, detail="ok")


async def _with_server(security: GrpcSecurity, body):
    server = security.server()
    errors.add_service(server, _Ok(), health_pb2.DESCRIPTOR.services_by_name["Health"])
    port = security.add_port(server, "127.0.0.1:0")
    await server.start()
    try:
        return await body(f"127.0.0.1:{port}")
    finally:
        await server.stop(None)


async def _check(address: str, client: GrpcSecurity, metadata=None, timeout: float = 5):
    """One Health.Check; -> "ok" or the status code's name."""
    async with client.channel(address) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout,
                metadata=client.metadata if metadata is None else metadata)
        except grpc.aio.AioRpcError as e:
            assert TOKEN not in (e.details() or "") and TOKEN not in (e.debug_error_string() or "")
            return e.code().name
        return reply.detail


# ---- the token ------------------------------------------------------------------------------------------------------
def test_calls_need_exactly_the_cluster_token():
    plain = GrpcSecurity()

    async def body(address):
        seen = {
            "missing": await _check(address, plain),
            "wrong": await _check(address, GrpcSecurity(token=TOKEN + "x")),
            "prefix": await _check(address, GrpcSecurity(token=TOKEN[:-1])),
            "not bearer": await _check(address, plain, (("authorization", f"Basic {TOKEN}"),)),
            "twice": await _check(address, plain, (("authorization", f"Bearer {TOKEN}"),) * 2),
            "other key": await _check(address, plain, (("x-token", TOKEN),)),
            "right": await _check(address, GrpcSecurity(token=TOKEN)),
        }
        async with grpc.aio.insecure_channel(address) as channel:  # no such method: refused before it is looked up
            unknown = channel.unary_unary("/moemesh.Nope/Call")
            for metadata, name in ((None, "unknown method, no token"),
                                   (GrpcSecurity(token=TOKEN).metadata, "unknown method, token")):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await unknown(b"", timeout=5, metadata=metadata)
                seen[name] = info.value.code().name
        seen["right again"] = await _check(address, GrpcSecurity(token=TOKEN))
        return seen

    seen = asyncio.run(_with_server(GrpcSecurity(token=TOKEN), body))
    assert seen == {"missing": "UNAUTHENTICATED", "wrong": "UNAUTHENTICATED", "prefix": "UNAUTHENTICATED",
                    "not bearer": "UNAUTHENTICATED", "twice": "UNAUTHENTICATED", "other key": "UNAUTHENTICATED",
                    "right": "ok", "unknown method, no token": "UNAUTHENTICATED",
                    "unknown method, token": "UNIMPLEMENTED", "right again": "ok"}


def test_unauthenticated_maps_to_its_exception_and_the_token_stays_out_of_reprs():
    exc = errors.exception_for(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_DETAILS)
    assert isinstance(exc, errors.Unauthenticated) and isinstance(exc, PermissionError)
    assert errors.status_for(exc) == grpc.StatusCode.UNAUTHENTICATED
    security = GrpcSecurity(token=TOKEN)
    assert TOKEN not in repr(security) and TOKEN not in str(security)
    with pytest.raises(ValueError, match="token") as info:
        GrpcSecurity(token="has a space")
    assert "has a space" not in str(info.value)


# ---- TLS ------------------------------------------------------------------------------------------------------------
def test_tls_server_only(pki):
    cert, key, ca = pki["node"]
    _, _, other_ca = pki["other"]
    tls = TlsFiles(cert, key, ca)

    async def body(address):
        return {"tls": await _check(address, GrpcSecurity(token=TOKEN, tls=tls)),
                "plaintext client": await _check(address, GrpcSecurity(token=TOKEN)),
                "another CA": await _check(address, GrpcSecurity(token=TOKEN, tls=TlsFiles(cert, key, other_ca))),
                "tls, no token": await _check(address, GrpcSecurity(tls=tls))}

    seen = asyncio.run(_with_server(GrpcSecurity(token=TOKEN, tls=tls), body))
    assert seen == {"tls": "ok", "plaintext client": "UNAVAILABLE", "another CA": "UNAVAILABLE",
                    "tls, no token": "UNAUTHENTICATED"}


def test_mutual_tls_requires_a_client_certificate_from_the_ca(pki):
    cert, key, ca = pki["node"]
    other_cert, other_key, _ = pki["other"]
    mutual = TlsFiles(cert, key, ca, mutual=True)

    async def body(address):
        return {"mutual": await _check(address, GrpcSecurity(token=TOKEN, tls=mutual)),
                "no client cert": await _check(address, GrpcSecurity(token=TOKEN, tls=TlsFiles(cert, key, ca))),
                "client cert of another CA": await _check(address, GrpcSecurity(
                    token=TOKEN, tls=TlsFiles(other_cert, other_key, ca, mutual=True)))}

    seen = asyncio.run(_with_server(GrpcSecurity(token=TOKEN, tls=mutual), body))
    assert seen == {"mutual": "ok", "no client cert": "UNAVAILABLE", "client cert of another CA": "UNAVAILABLE"}


def test_server_name_lets_one_certificate_serve_any_address(pki):
    cert, key, ca = pki["named"]  # issued to moemesh.internal only; dialled as 127.0.0.1

    async def body(address):
        return {"by name": await _check(address, GrpcSecurity(tls=TlsFiles(cert, key, ca,
                                                                            server_name="moemesh.internal"))),
                "by address": await _check(address, GrpcSecurity(tls=TlsFiles(cert, key, ca)))}

    seen = asyncio.run(_with_server(GrpcSecurity(tls=TlsFiles(cert, key, ca)), body))
    assert seen == {"by name": "ok", "by address": "UNAVAILABLE"}


def test_unreadable_tls_files_are_a_value_error_naming_the_file(tmp_path):
    missing = str(tmp_path / "nope.pem")
    for make in (TlsFiles(missing, missing, missing).server_credentials,
                 TlsFiles(missing, missing, missing).channel_credentials):
        with pytest.raises(ValueError, match="nope.pem"):
            make()


# ---- the transports over real shards --------------------------------------------------------------------------------
def _batch(cfg, n: int = 5) -> TokenBatch:
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[0, 1], [2, -1], [0, 2], [1, 1], [-1, -1]])[:n]
    return TokenBatch(0, torch.randn(n, cfg.hidden_size, generator=g), ids, torch.rand(n, 2, generator=g))


async def _outcome(call):
    try:
        return await call
    except Exception as e:  # noqa: BLE001 - the outcome is the exception
        return e


def test_expert_transport_carries_token_and_mutual_tls(pki, expert_shard):
    cert, key, ca = pki["node"]
    _, _, other_ca = pki["other"]
    secure = GrpcSecurity(token=TOKEN, tls=TlsFiles(cert, key, ca, mutual=True))
    batch = _batch(expert_shard.cfg)
    clients = {"right": secure, "no token": GrpcSecurity(tls=secure.tls),
               "no CA": GrpcSecurity(token=TOKEN, tls=TlsFiles(cert, key, other_ca, mutual=True))}

    async def main():
        server, port = await serve_expert_shard(expert_shard, security=secure)
        outcomes = {}
        try:
            for name, security in clients.items():
                transport = GrpcTransport({0: f"127.0.0.1:{port}"}, security=security, timeout_s=3, retries=1)
                outcomes[name] = await _outcome(transport.dispatch(0, batch))
                await transport.close()
        finally:
            await server.stop(None)
        return outcomes

    outcomes = asyncio.run(main())
    torch.testing.assert_close(outcomes["right"], asyncio.run(expert_shard.dispatch(batch)))
    assert isinstance(outcomes["no token"], errors.Unauthenticated), outcomes["no token"]
    assert isinstance(outcomes["no CA"], (errors.Unavailable, TimeoutError)), outcomes["no CA"]


def test_engram_transport_carries_token_and_tls(pki, engram_shard):
    cert, key, ca = pki["node"]
    _, _, other_ca = pki["other"]
    secure = GrpcSecurity(token=TOKEN, tls=TlsFiles(cert, key, ca))
    layer = min(engram_shard.ranges)
    rows = {layer: torch.arange(engram_shard.ranges[layer][0], engram_shard.ranges[layer][0] + 4)}
    clients = {"right": secure, "no token": GrpcSecurity(tls=secure.tls),
               "no CA": GrpcSecurity(token=TOKEN, tls=TlsFiles(cert, key, other_ca))}

    async def main():
        server, port = await serve_engram_shard(engram_shard, security=secure)
        outcomes = {}
        try:
            for name, security in clients.items():
                transport = GrpcEngramTransport({0: f"127.0.0.1:{port}"}, security=security)
                outcomes[name] = await _outcome(transport.lookup(0, rows, timeout_s=3))
                await transport.close()
        finally:
            await server.stop(None)
        return outcomes

    outcomes = asyncio.run(main())
    assert torch.equal(outcomes["right"][layer], engram_shard.lookup_many(rows)[layer])
    assert isinstance(outcomes["no token"], errors.Unauthenticated), outcomes["no token"]
    assert isinstance(outcomes["no CA"], (errors.Unavailable, TimeoutError)), outcomes["no CA"]
