"""Where a command's driver runs: in this process, or on the cluster for a ``ray://`` address
(Ray Client cannot run Ray Data/Train drivers remotely, so the driver itself is shipped).
The public face of :mod:`selfment_dist.pipeline._internal.ray_runtime` for the command line."""
from selfment_dist.pipeline._internal.ray_runtime import call_as_driver

__all__ = ["call_as_driver"]
