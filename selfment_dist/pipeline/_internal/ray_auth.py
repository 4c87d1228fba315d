"""Connect to a cluster with the cluster's own token-authentication mode.

Ray 2.60 decides a driver's authentication mode in the driver alone: ``RAY_AUTH_MODE=token`` in
its environment, or (``RAY_AUTH_MODE`` unset, address ``"auto"``) a token file in
``~/.ray/auth_token``, which the first local ``ray.init()`` on a machine writes. A driver in
token mode refuses every call that carries no token, and a cluster started without token auth
(``RAY_AUTH_MODE`` unset when its head started, e.g. before that file existed) sends none. The
driver still connects and submits, but the GCS's first call back to the driver, the one that
watches each new actor's owner, is refused ("Missing authorization header in request!" in the
driver's log); the GCS takes the refusal for a dead owner and destroys the actor at once. Every
actor of the run dies before it starts, with a misleading cause: "all references to the actor
were removed including lineage ref count. The actor never ran" (docs/faults.md).

So, before connecting in token mode, one unauthenticated call asks the cluster's GCS whether it
checks tokens. When it does not, the driver runs without token auth too: the cluster already
accepts anyone, so this exposes nothing the cluster does not, and it is the only mode in which
the cluster's processes can reach the driver.
"""
from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

AUTH_MODE_ENV = "RAY_AUTH_MODE"
#: Seconds the one unauthenticated call may take (a live GCS answers in milliseconds).
PROBE_TIMEOUT_S = 5.0


def driver_uses_token_auth(address: str) -> bool:
    """Whether ``ray.init(address=address)`` would run this process in token mode (Ray's own
    rule: the environment variable, else a token file when the address is auto-detected)."""
    mode = os.environ.get(AUTH_MODE_ENV)
    if mode is not None:
        return mode.strip().lower() == "token"
    return address == "auto" and _token_available()


def _token_available() -> bool:
    """A token Ray would load (``RAY_AUTH_TOKEN``, its path variable, ``~/.ray/auth_token``)."""
    from ray._raylet import AuthenticationTokenLoader

    return bool(AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True))


def cluster_checks_tokens(gcs_address: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool | None:
    """True or False: whether the GCS at ``host:port`` refuses a call without a token; None
    when it cannot be told (unreachable, an unexpected answer): then nothing is changed and
    ``ray.init`` reports what is wrong in its own words."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    try:
        with grpc.insecure_channel(gcs_address) as channel:
            stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s)
        return False
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            return True
        logger.debug("token-auth probe of %s: %s", gcs_address, exc)
        return None
    except Exception as exc:  # a bad address: ray.init says so better
        logger.debug("token-auth probe of %s: %s", gcs_address, exc)
        return None


def match_cluster_auth(address: str) -> bool:
    """Before ``ray.init(address=address)`` (not ``ray://``): when this process would connect
    in token mode to a cluster that does not check tokens, turn token mode off for this process
    (``RAY_AUTH_MODE=disabled``, which its child processes inherit) and say so. Returns whether
    it did."""
    if address.startswith("ray://") or not driver_uses_token_auth(address):
        return False
    from ray._private.services import canonicalize_bootstrap_address

    try:
        gcs_address = canonicalize_bootstrap_address(address)
    except Exception as exc:  # no cluster found: ray.init raises its own error
        logger.debug("token-auth probe skipped for %r: %s", address, exc)
        return False
    if not gcs_address or cluster_checks_tokens(gcs_address) is not False:
        return False
    logger.warning("The Ray cluster at %s does not use token authentication, but this process "
                   "would connect with it (%s): connecting without it, since the cluster's "
                   "processes send no token and every actor would otherwise be destroyed "
                   "at start", gcs_address,
                   f"{AUTH_MODE_ENV}=token" if os.environ.get(AUTH_MODE_ENV)
                   else "a token file was found")
    _set_auth_mode("disabled")
    return True


def _set_auth_mode(mode: str) -> None:
    """What Ray does to enable token auth (ray._private.authentication), with ``mode``: the
    environment for this process and its children, and Ray's cached config re-read from it."""
    from ray._raylet import Config

    os.environ[AUTH_MODE_ENV] = mode
    Config.initialize("")
