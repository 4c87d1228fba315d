"""Fail fast, in one line, when an object store's endpoint cannot be reached.

Without this, an unreachable S3 endpoint (a typo in ``--storage-option endpoint_url=…``, a
server that is down) costs botocore's and s3fs's own retries — about 40 s — and ends in several
``EndpointConnectionError`` tracebacks. :func:`check_reachable` sends one ``HEAD /`` to the
endpoint first and waits for any HTTP answer (an S3 server answers even an unsigned request,
if only with 403; a bare TCP connection is no proof: some networks accept every connection):
:data:`ATTEMPTS` tries of :data:`CONNECT_TIMEOUT_S` each, :data:`BACKOFF_S` apart, so an endpoint that refuses is reported within about a second and one that never answers
within :data:`bound_s` (about 8 s). Each endpoint is probed once per process; a success is
remembered, a failure is asked again next time.

Only endpoints the user named are probed (``endpoint_url`` in the storage options, at the top
or under ``client_kwargs``, or the ``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3`` variables): the
default AWS endpoints are reached through whatever the machine's AWS configuration says.
"""
from __future__ import annotations

import errno
import http.client
import logging
import os
import socket
import ssl
import time
from urllib.parse import urlsplit, urlunsplit

from selfment_dist.errors import SelfmentUserError

logger = logging.getLogger(__name__)

__all__ = ["StorageUnreachableError", "check_reachable", "endpoint_of", "bound_s",
           "ATTEMPTS", "CONNECT_TIMEOUT_S", "BACKOFF_S"]

#: Connection attempts, seconds each may wait for the endpoint, and seconds between attempts.
ATTEMPTS = 3
CONNECT_TIMEOUT_S = 2.0
BACKOFF_S = (0.5, 1.0)

_S3_PROTOCOLS = {"s3", "s3a", "s3n"}
_reached: set[tuple[str, int, bool]] = set()


class StorageUnreachableError(SelfmentUserError, ConnectionError):
    """The storage endpoint of an input or output does not answer."""


def bound_s() -> float:
    """The longest :func:`check_reachable` waits for one endpoint (DNS look-ups aside)."""
    return ATTEMPTS * CONNECT_TIMEOUT_S + sum(BACKOFF_S[:ATTEMPTS - 1])


def endpoint_of(uri: str, storage_options: dict | None) -> str | None:
    """The endpoint URL the user named for ``uri``'s object store, or None (a local path, a
    protocol we do not probe, or the store's default endpoint)."""
    scheme = str(uri).partition("://")[0].lower() if "://" in str(uri) else ""
    if scheme not in _S3_PROTOCOLS:
        return None
    options = storage_options or {}
    client = options.get("client_kwargs") if isinstance(options.get("client_kwargs"), dict) \
        else {}
    url = (options.get("endpoint_url") or client.get("endpoint_url")
           or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
    return str(url) if url else None


def _shown(url: str) -> str:
    """``url`` without user name or password (never printed)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _address(url: str) -> tuple[str, int, bool]:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    try:
        port = parts.port
    except ValueError:
        raise StorageUnreachableError(f"storage endpoint {_shown(url)!r} has an invalid port; "
                                      "check --storage-option endpoint_url") from None
    if not parts.hostname:
        raise StorageUnreachableError(f"storage endpoint {url!r} names no host; check "
                                      "--storage-option endpoint_url")
    tls = parts.scheme == "https"
    return parts.hostname, port or (443 if tls else 80), tls


def _ask(host: str, port: int, tls: bool) -> None:
    """One ``HEAD /``; returns when any HTTP answer came (its status does not matter)."""
    if tls:  # reachability only: the certificate is the S3 client's business
        conn = http.client.HTTPSConnection(host, port, timeout=CONNECT_TIMEOUT_S,
                                           context=ssl._create_unverified_context())
    else:
        conn = http.client.HTTPConnection(host, port, timeout=CONNECT_TIMEOUT_S)
    try:
        conn.request("HEAD", "/")
        conn.getresponse().read()
    finally:
        conn.close()


def _why(exc: Exception) -> str:
    if isinstance(exc, http.client.HTTPException):
        return f"no HTTP answer ({type(exc).__name__})"
    if isinstance(exc, socket.timeout):
        return f"no answer within {CONNECT_TIMEOUT_S:g} s"
    if isinstance(exc, socket.gaierror):
        return f"host name not found ({exc.strerror or exc})"
    if exc.errno == errno.ECONNREFUSED:
        return "connection refused"
    return exc.strerror or str(exc) or type(exc).__name__


def check_reachable(uris, storage_options: dict | None) -> None:
    """Raise :class:`StorageUnreachableError` (one line, naming the endpoint and the URI) when
    the endpoint named for any of ``uris`` gives no HTTP answer (see module
    docstring for the bound)."""
    for uri in [uris] if isinstance(uris, str) else uris:
        url = endpoint_of(uri, storage_options)
        if url is None:
            continue
        address = _address(url)
        if address in _reached:
            continue
        start, last = time.monotonic(), None
        for attempt in range(ATTEMPTS):
            if attempt:
                time.sleep(BACKOFF_S[min(attempt - 1, len(BACKOFF_S) - 1)])
            try:
                _ask(*address)
                _reached.add(address)
                break
            except (OSError, http.client.HTTPException) as exc:
                last = exc
                logger.debug("storage endpoint %s: attempt %d failed: %s", _shown(url),
                             attempt + 1, exc)
        else:
            raise StorageUnreachableError(
                f"cannot reach the storage endpoint {_shown(url)} (for {uri}): {_why(last)} "
                f"after {ATTEMPTS} tries in {time.monotonic() - start:.1f} s; check "
                "--storage-option endpoint_url and that the server is up")
