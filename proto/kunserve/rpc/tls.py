"""TLS and mutual TLS for KunServe's gRPC connections (gateway -> agent, operator -> agent, agent -> agent).

The material is three PEM files, in the shape cert-manager writes into a Kubernetes Secret and the Helm chart
mounts at /etc/kunserve/tls: `tls.crt` (certificate chain), `tls.key` (its private key) and `ca.crt` (the CA
that signs the peers). One certificate can serve both ends (usages server auth + client auth).

    tls = TlsFiles.from_args(args)                   # --tls-cert --tls-key --tls-ca --tls-server-name
    port = add_port(server, "0.0.0.0:50051", tls)    # sync or grpc.aio server; insecure when tls is None
    channel = aio_channel("agent-0.pool-agents.ns.svc:50051", tls, options)

Server side: with a CA the server requires and verifies client certificates (mutual TLS); without one it
only proves its own identity. The server re-reads the files when they change on disk (cert-manager renews
certificates in place), so new connections get the renewed certificate without a restart.

Client side: the CA verifies the server (the system roots when none is given); a certificate and key are
presented when given (needed by a mutual-TLS server). `server_name` is the name checked in the server's
certificate instead of the dialled host: pods are dialled by per-pod DNS names, so one certificate with a
fixed name (the chart's `tls.serverName`) serves every agent.

Every problem with the files (missing, unreadable, not PEM, a key that does not match its certificate) is a
`TlsError` naming the file and the flag, raised when the credentials are built rather than at the first
handshake. This module imports neither torch nor the generated stubs.
"""

from __future__ import annotations

import argparse
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger("kunserve.rpc.tls")

CERT_FLAG, KEY_FLAG, CA_FLAG, SERVER_NAME_FLAG = "--tls-cert", "--tls-key", "--tls-ca", "--tls-server-name"
_PEM_MARKERS = {"certificate": "-----BEGIN CERTIFICATE-----", "private key": "PRIVATE KEY-----"}
ChannelOptions = Sequence[tuple[str, Any]]


class TlsError(ValueError):
    """The TLS files or flags cannot be used (the message names the file and the flag)."""


def add_tls_arguments(parser: argparse.ArgumentParser, *, server: bool = False) -> None:
    """The --tls-* flags of `kunserve agent` (server=True), `kunserve gateway` and `kunserve operator`."""
    group = parser.add_argument_group("TLS (gRPC)")
    group.add_argument(CERT_FLAG, type=Path, default=None, metavar="PEM",
                       help="certificate chain (tls.crt): served" + (" to clients and" if server else "")
                       + " presented to mutual-TLS servers")
    group.add_argument(KEY_FLAG, type=Path, default=None, metavar="PEM", help="private key of --tls-cert (tls.key)")
    group.add_argument(CA_FLAG, type=Path, default=None, metavar="PEM",
                       help="CA certificate (ca.crt) that verifies the peers"
                       + ("; a server given one requires client certificates (mutual TLS)" if server else ""))
    group.add_argument(SERVER_NAME_FLAG, default=None, metavar="NAME",
                       help="name expected in the servers' certificates (default: the host dialled)")


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Paths of the PEM files; `None` fields are not used."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    server_name: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TlsFiles | None:
        """The files the --tls-* flags name; None when none is given (plaintext). Raises TlsError."""
        files = cls(cert=getattr(args, "tls_cert", None), key=getattr(args, "tls_key", None),
                    ca=getattr(args, "tls_ca", None), server_name=getattr(args, "tls_server_name", None) or None)
        if files.cert is None and files.key is None and files.ca is None:
            if files.server_name:
                raise TlsError(f"{SERVER_NAME_FLAG} needs TLS: give {CA_FLAG} (and {CERT_FLAG}/{KEY_FLAG})")
            return None
        files.check_pair()
        return files

    def check_pair(self) -> None:
        if (self.cert is None) != (self.key is None):
            given, missing = (CERT_FLAG, KEY_FLAG) if self.key is None else (KEY_FLAG, CERT_FLAG)
            raise TlsError(f"{given} needs {missing}: a certificate is used with its private key")

    # ------------------------------------------------------------------------------------- reading

    def read(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        """(certificate chain, key, CA) as PEM bytes, checked; raises TlsError."""
        self.check_pair()
        cert = _read_pem(self.cert, "certificate", CERT_FLAG) if self.cert is not None else None
        key = _read_pem(self.key, "private key", KEY_FLAG) if self.key is not None else None
        ca = _read_pem(self.ca, "certificate", CA_FLAG) if self.ca is not None else None
        if self.cert is not None and self.key is not None:
            _check_key_matches(self.cert, self.key)
        if self.ca is not None:
            try:
                ssl.create_default_context(cafile=str(self.ca))
            except ssl.SSLError as exc:
                raise TlsError(f"{CA_FLAG} {self.ca}: not a usable CA certificate: {exc}") from exc
        return cert, key, ca

    def _mtimes(self) -> tuple[int, ...]:
        return tuple(_mtime(p) for p in (self.cert, self.key, self.ca) if p is not None)


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns  # follows the symlinks of a Secret volume (swapped atomically)
    except OSError:
        return -1


def _read_pem(path: Path, what: str, flag: str) -> bytes:
    if not path.exists():
        raise TlsError(f"{flag} {path}: the {what} file does not exist")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TlsError(f"{flag} {path}: the {what} file cannot be read: {exc.strerror or exc}") from exc
    if _PEM_MARKERS[what].encode() not in data:
        raise TlsError(f"{flag} {path}: not a PEM {what} (no '{_PEM_MARKERS[what].strip('-')}' block)")
    return data


def _check_key_matches(cert: Path, key: Path) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc).lower():
            raise TlsError(f"{KEY_FLAG} {key} is not the private key of {CERT_FLAG} {cert}") from exc
        raise TlsError(f"{CERT_FLAG} {cert} / {KEY_FLAG} {key}: unusable: {exc}") from exc


# ------------------------------------------------------------------------------------------------ server


def server_credentials(files: TlsFiles, *, reload: bool = True) -> grpc.ServerCredentials:
    """Credentials of a gRPC server (sync or aio): its certificate and key; with `files.ca`, clients must
    present a certificate signed by that CA (mutual TLS). With reload, files changed on disk are served to
    new connections (a renewal that fails to load keeps the previous certificate and logs why)."""
    if files.cert is None or files.key is None:
        raise TlsError(f"a gRPC server needs {CERT_FLAG} and {KEY_FLAG}")
    cert, key, ca = files.read()
    assert cert is not None and key is not None
    mutual = ca is not None
    if not reload:
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=mutual)
    initial = grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)
    seen = [files._mtimes()]

    def fetch() -> Any:  # called by gRPC for each new handshake
        now = files._mtimes()
        if now == seen[0]:
            return None  # unchanged: keep the current configuration
        try:
            new_cert, new_key, new_ca = files.read()
        except TlsError as exc:  # e.g. a rotation half-written: try again at the next handshake
            log.warning("TLS files changed but cannot be loaded yet, keeping the current ones: %s", exc)
            return None
        if (new_ca is not None) != mutual:
            log.warning("TLS files changed: %s appeared or vanished; mutual TLS stays %s", CA_FLAG, mutual)
            return None
        assert new_cert is not None and new_key is not None
        seen[0] = now
        log.info("TLS certificate reloaded from %s", files.cert)
        return grpc.ssl_server_certificate_configuration([(new_key, new_cert)], root_certificates=new_ca)

    return grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=mutual)


def add_port(server: Any, address: str, files: TlsFiles | None, *, reload: bool = True) -> int:
    """Bind a sync `grpc.Server` or a `grpc.aio.Server` to address, with TLS when files is given; returns
    the port (0 when it could not bind, as gRPC does)."""
    if files is None:
        return int(server.add_insecure_port(address))
    return int(server.add_secure_port(address, server_credentials(files, reload=reload)))


# ------------------------------------------------------------------------------------------------ client


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """Credentials of a client: the CA that verifies the server (system roots when None) and, when given,
    the client certificate and key (for mutual TLS)."""
    cert, key, ca = files.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def channel_options(files: TlsFiles | None, options: ChannelOptions = ()) -> list[tuple[str, Any]]:
    """options plus the server-name override (when TLS is on and a name is set)."""
    out = [o for o in options if o[0] != "grpc.ssl_target_name_override"]
    if files is not None and files.server_name:
        out.append(("grpc.ssl_target_name_override", files.server_name))
    return out


def channel(target: str, files: TlsFiles | None, options: ChannelOptions = ()) -> grpc.Channel:
    """A sync channel: TLS when files is given, plaintext otherwise."""
    if files is None:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(target, channel_credentials(files), options=channel_options(files, options))


def aio_channel(target: str, files: TlsFiles | None, options: ChannelOptions = ()) -> grpc.aio.Channel:
    """A grpc.aio channel: TLS when files is given, plaintext otherwise."""
    if files is None:
        return grpc.aio.insecure_channel(target, options=list(options))
    return grpc.aio.secure_channel(target, channel_credentials(files), options=channel_options(files, options))


def describe(files: TlsFiles | None) -> str:
    """For logs: 'plaintext', 'TLS' or 'mutual TLS' (never the key material)."""
    if files is None:
        return "plaintext"
    return "mutual TLS" if files.ca is not None and files.cert is not None else "TLS"


__all__ = [
    "CA_FLAG",
    "CERT_FLAG",
    "KEY_FLAG",
    "SERVER_NAME_FLAG",
    "TlsError",
    "TlsFiles",
    "add_port",
    "add_tls_arguments",
    "aio_channel",
    "channel",
    "channel_credentials",
    "channel_options",
    "describe",
    "server_credentials",
]
