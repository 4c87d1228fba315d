"""The package versions a run records in its manifest or report (provenance)."""
from __future__ import annotations

import platform
from importlib import metadata

#: What a pseudo-label or segment manifest records.
RUN_PACKAGES = ("selfment-dist", "torch", "timm", "ray", "pyarrow", "numpy")


def versions(packages: tuple[str, ...] = RUN_PACKAGES) -> dict[str, str | None]:
    """``{"python": ..., "<package>": version or None}``, package names with ``_`` for ``-``."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in packages:
        try:
            out[dist.replace("-", "_")] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist.replace("-", "_")] = None
    return out
