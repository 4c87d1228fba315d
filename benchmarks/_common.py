"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<name>.py``)."""
from __future__ import annotations

import os


def load_avg() -> str:
    """The 1/5/15-minute load average, for the report: a busy machine skews every figure."""
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def sync(device) -> None:
    """Wait for the device's queued kernels: a timer stopped without this on a GPU measures
    kernel launches, not the work."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def start_ray(address: str | None, num_cpus: int | None) -> None:
    """Connect to ``address``, or start a quiet local Ray with ``num_cpus`` (default: all)."""
    import ray

    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        # address="local": a Ray of its own even where another runs on this machine (a plain
        # ray.init() would attach to the machine's latest cluster).
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
