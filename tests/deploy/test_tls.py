"""kunserve.rpc.tls: real TLS and mutual-TLS gRPC calls over loopback, with certificates made at test time
(the `cryptography` package), sync and grpc.aio, plus the errors for unusable files."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import os
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from kunserve.rpc.tls import (
    TlsError,
    TlsFiles,
    add_port,
    add_tls_arguments,
    aio_channel,
    channel,
    describe,
    server_credentials,
)

pytest.importorskip("cryptography")
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

METHOD = "/kunserve.test.Echo/Echo"
TIMEOUT_S = 5.0


# ------------------------------------------------------------------------------------------ certificates


@dataclass
class Issued:
    cert: Path
    key: Path


class Ca:
    """A throwaway CA that issues ECDSA P-256 certificates into a directory."""

    def __init__(self, directory: Path, name: str) -> None:
        self.dir, self.name = directory, name
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256()))
        self.path = directory / f"{name}-ca.crt"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, common_name: str, dns: tuple[str, ...] = ("localhost",), ips: tuple[str, ...] = ("127.0.0.1",),
              stem: str | None = None) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=2))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(self.key, hashes.SHA256()))
        stem = stem or f"{self.name}-{common_name}"
        issued = Issued(self.dir / f"{stem}.crt", self.dir / f"{stem}.key")
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        issued.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
        return issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("pki")
    ca, other = Ca(d, "kunserve"), Ca(d, "other")
    return {
        "ca": ca, "other": other,
        "server": ca.issue("agent-0"),
        "named": ca.issue("kunserve-internal", dns=("kunserve-internal",), ips=()),
        "client": ca.issue("gateway-0"),
        "intruder": other.issue("intruder"),
    }


# ------------------------------------------------------------------------------------------------ servers


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    """Echoes the request, followed by the client certificate's common name the server saw (if any)."""
    names = context.auth_context().get("x509_common_name", [])
    return request + b"|" + b",".join(names)


HANDLER = grpc.method_handlers_generic_handler("kunserve.test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(
    _echo)})


@pytest.fixture
def serve() -> Iterator[Any]:
    """serve(files) starts a sync gRPC server on 127.0.0.1 and returns its port."""
    servers: list[grpc.Server] = []

    def start(files: TlsFiles | None, reload: bool = True) -> int:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        server.add_generic_rpc_handlers((HANDLER,))
        port = add_port(server, "127.0.0.1:0", files, reload=reload)
        assert port
        server.start()
        servers.append(server)
        return port

    yield start
    for server in servers:
        server.stop(grace=None)


def call(port: int, files: TlsFiles | None, host: str = "localhost") -> bytes:
    with channel(f"{host}:{port}", files) as ch:
        reply: bytes = ch.unary_unary(METHOD)(b"ping", timeout=TIMEOUT_S)
        return reply


def rejected(port: int, files: TlsFiles | None, host: str = "localhost") -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call(port, files, host)
    code: grpc.StatusCode = info.value.code()
    return code


# ---------------------------------------------------------------------------------------------- TLS, sync


def test_tls_call_verifies_the_server(pki: dict[str, Any], serve: Any) -> None:
    server = TlsFiles(cert=pki["server"].cert, key=pki["server"].key)
    port = serve(server)
    assert call(port, TlsFiles(ca=pki["ca"].path)) == b"ping|"  # no client certificate: none seen
    assert rejected(port, TlsFiles(ca=pki["other"].path)) == grpc.StatusCode.UNAVAILABLE  # wrong CA
    assert rejected(port, TlsFiles()) == grpc.StatusCode.UNAVAILABLE  # system roots do not know this CA
    assert rejected(port, None) == grpc.StatusCode.UNAVAILABLE  # plaintext to a TLS port
    assert describe(server) == "TLS"


def test_mutual_tls_requires_a_client_certificate_of_the_ca(pki: dict[str, Any], serve: Any) -> None:
    port = serve(TlsFiles(cert=pki["server"].cert, key=pki["server"].key, ca=pki["ca"].path))
    client = TlsFiles(cert=pki["client"].cert, key=pki["client"].key, ca=pki["ca"].path)
    assert call(port, client) == b"ping|gateway-0"  # the server saw who called
    assert describe(client) == "mutual TLS"
    assert rejected(port, TlsFiles(ca=pki["ca"].path)) == grpc.StatusCode.UNAVAILABLE  # no client certificate
    intruder = TlsFiles(cert=pki["intruder"].cert, key=pki["intruder"].key, ca=pki["ca"].path)
    assert rejected(port, intruder) == grpc.StatusCode.UNAVAILABLE  # a certificate of another CA


def test_server_name_override_checks_one_name_whatever_host_is_dialled(pki: dict[str, Any], serve: Any) -> None:
    port = serve(TlsFiles(cert=pki["named"].cert, key=pki["named"].key, ca=pki["ca"].path))
    client = TlsFiles(cert=pki["client"].cert, key=pki["client"].key, ca=pki["ca"].path)
    assert rejected(port, client, host="127.0.0.1") == grpc.StatusCode.UNAVAILABLE  # not in the certificate
    named = TlsFiles(cert=client.cert, key=client.key, ca=client.ca, server_name="kunserve-internal")
    assert call(port, named, host="127.0.0.1") == b"ping|gateway-0"
    wrong = TlsFiles(cert=client.cert, key=client.key, ca=client.ca, server_name="someone-else")
    assert rejected(port, wrong, host="127.0.0.1") == grpc.StatusCode.UNAVAILABLE


def test_plaintext_when_no_tls_is_configured(serve: Any) -> None:
    port = serve(None)
    assert call(port, None) == b"ping|"
    assert describe(None) == "plaintext"


def test_a_renewed_certificate_is_served_without_a_restart(pki: dict[str, Any], serve: Any, tmp_path: Path) -> None:
    """cert-manager renews the Secret in place: new connections get the new certificate."""
    ca, other = pki["ca"], pki["other"]
    live = TlsFiles(cert=tmp_path / "tls.crt", key=tmp_path / "tls.key")
    live.cert.write_bytes(pki["server"].cert.read_bytes())  # type: ignore[union-attr]
    live.key.write_bytes(pki["server"].key.read_bytes())  # type: ignore[union-attr]
    port = serve(live)
    assert call(port, TlsFiles(ca=ca.path)) == b"ping|"
    renewed = other.issue("agent-0", stem="renewed")  # issued by another CA, so the client can tell
    live.key.write_bytes(renewed.key.read_bytes())  # type: ignore[union-attr]
    live.cert.write_bytes(renewed.cert.read_bytes())  # type: ignore[union-attr]
    later = datetime.datetime.now().timestamp() + 5
    for path in (live.cert, live.key):
        os.utime(path, (later, later))  # type: ignore[arg-type]
    assert call(port, TlsFiles(ca=other.path)) == b"ping|"
    assert rejected(port, TlsFiles(ca=ca.path)) == grpc.StatusCode.UNAVAILABLE


# ----------------------------------------------------------------------------------------------- grpc.aio


def test_mutual_tls_over_grpc_aio(pki: dict[str, Any]) -> None:
    async def scenario() -> tuple[bytes, grpc.StatusCode]:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((HANDLER,))
        port = add_port(server, "127.0.0.1:0", TlsFiles(cert=pki["server"].cert, key=pki["server"].key,
                                                        ca=pki["ca"].path))
        await server.start()
        try:
            client = TlsFiles(cert=pki["client"].cert, key=pki["client"].key, ca=pki["ca"].path)
            async with aio_channel(f"localhost:{port}", client) as ch:
                reply = await ch.unary_unary(METHOD)(b"ping", timeout=TIMEOUT_S)
            async with aio_channel(f"localhost:{port}", TlsFiles(ca=pki["ca"].path)) as ch:
                try:
                    await ch.unary_unary(METHOD)(b"ping", timeout=TIMEOUT_S)
                    code = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as exc:
                    code = exc.code()
            return reply, code
        finally:
            await server.stop(None)

    reply, code = asyncio.run(scenario())
    assert reply == b"ping|gateway-0"
    assert code == grpc.StatusCode.UNAVAILABLE


# -------------------------------------------------------------------------------------------------- errors


def test_missing_unreadable_and_non_pem_files_are_clear_errors(pki: dict[str, Any], tmp_path: Path) -> None:
    key = pki["server"].key
    with pytest.raises(TlsError, match=r"--tls-cert .*nope\.crt: the certificate file does not exist"):
        server_credentials(TlsFiles(cert=tmp_path / "nope.crt", key=key))
    with pytest.raises(TlsError, match=r"--tls-cert .*: the certificate file cannot be read: Is a directory"):
        server_credentials(TlsFiles(cert=tmp_path, key=key))
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("hello\n")
    with pytest.raises(TlsError, match=r"--tls-cert .*garbage\.crt: not a PEM certificate"):
        server_credentials(TlsFiles(cert=garbage, key=key))
    with pytest.raises(TlsError, match=r"--tls-key .*\.crt: not a PEM private key"):
        server_credentials(TlsFiles(cert=pki["server"].cert, key=pki["server"].cert))
    with pytest.raises(TlsError, match=r"--tls-ca .*garbage\.crt: not a PEM certificate"):
        server_credentials(TlsFiles(cert=pki["server"].cert, key=key, ca=garbage))
    with pytest.raises(TlsError, match=r"--tls-key .* is not the private key of --tls-cert"):
        server_credentials(TlsFiles(cert=pki["server"].cert, key=pki["client"].key))


def test_flags(pki: dict[str, Any]) -> None:
    parser = argparse.ArgumentParser()
    add_tls_arguments(parser, server=True)
    assert TlsFiles.from_args(parser.parse_args([])) is None
    files = TlsFiles.from_args(parser.parse_args([
        "--tls-cert", str(pki["server"].cert), "--tls-key", str(pki["server"].key), "--tls-ca", str(pki["ca"].path),
        "--tls-server-name", "kunserve-internal"]))
    assert files == TlsFiles(pki["server"].cert, pki["server"].key, pki["ca"].path, "kunserve-internal")
    with pytest.raises(TlsError, match="--tls-cert needs --tls-key"):
        TlsFiles.from_args(parser.parse_args(["--tls-cert", str(pki["server"].cert)]))
    with pytest.raises(TlsError, match="--tls-key needs --tls-cert"):
        TlsFiles.from_args(parser.parse_args(["--tls-key", str(pki["server"].key)]))
    with pytest.raises(TlsError, match="--tls-server-name needs TLS"):
        TlsFiles.from_args(parser.parse_args(["--tls-server-name", "x"]))
    with pytest.raises(TlsError, match="a gRPC server needs --tls-cert and --tls-key"):
        server_credentials(TlsFiles(ca=pki["ca"].path))
