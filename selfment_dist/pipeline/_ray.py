"""One Ray start-up for every pipeline entry point."""
from __future__ import annotations

import logging
import os

import ray

logger = logging.getLogger(__name__)


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> bool:
    """Make sure this process is connected to Ray.

    - Already connected (``ray.is_initialized()``, e.g. a test fixture or a caller's own
      ``ray.init``): nothing changes; ``address`` and ``num_cpus`` are ignored.
    - ``address`` given (``"auto"``, ``"HOST:PORT"``, ``"ray://HOST:10001"``), or ``RAY_ADDRESS``
      set in the environment (how Ray Jobs entrypoints find their cluster): connect to that cluster;
      ``num_cpus`` is ignored (the cluster owns its resources).
    - Otherwise: start a local Ray inside this process (``address="local"``, so a stray
      ``ray start`` on the same machine is never attached silently), with ``num_cpus`` CPUs
      (default: all) and no dashboard. Workers' output reaches the driver's terminal.

    Returns:
        True when this call started or connected Ray, False when it was already connected.
    """
    if ray.is_initialized():
        if address is not None:
            logger.debug("Ray already initialised; ignoring address=%r", address)
        return False
    target = address or os.environ.get("RAY_ADDRESS") or None
    if target:
        if num_cpus is not None:
            logger.warning("num_cpus=%s ignored: connecting to an existing Ray cluster at %s",
                           num_cpus, target)
        logger.info("Connecting to Ray at %s", target)
        ray.init(address=target, log_to_driver=True)
    else:
        logger.info("Starting a local Ray (num_cpus=%s)", num_cpus if num_cpus else "all")
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    return True
