"""A stage's inputs, listed before anything is written: work units outside the output."""
from __future__ import annotations

import logging

from selfment_dist.errors import UserValueError
from selfment_dist.io.storage import to_uri, url_to_fs

logger = logging.getLogger(__name__)


def outside_output(units: list[dict], fs, root: str) -> list[dict]:
    """Drop input files that lie inside the output (an output folder under an input folder):
    what a run writes there must not become input of the next run."""
    prefix = to_uri(fs, root.rstrip("/")) + "/"
    kept = [u for u in units if not u["uri"].startswith(prefix)]
    if len(kept) < len(units):
        logger.warning("ignoring %d input files inside the output %s", len(units) - len(kept),
                       prefix)
    return kept


def list_inputs(inputs: list[str], output: str, storage_options: dict | None, *,
                allow_empty: bool) -> tuple:
    """``(fs, root, units)``: the output's filesystem and path, and the inputs' work units
    outside it. Listed before anything is written, so a missing or empty input (an error unless
    ``allow_empty``) or an output that is a file leaves no trace. ``units.skipped`` counts the
    input files skipped on purpose (io/skip_rules.py), for the manifest and the summary."""
    from selfment_dist.io.sources import Units, enumerate_units

    fs, root = url_to_fs(output, storage_options)
    if fs.isfile(root):
        raise UserValueError(f"output {output} is a file; give a folder or prefix")
    listed = enumerate_units(inputs, storage_options)
    units = Units(outside_output(listed, fs, root), skipped=listed.skipped)
    if not units and not allow_empty:
        raise UserValueError(f"no images found in {', '.join(inputs)} (pass allow_empty / "
                         "--allow-empty to accept empty inputs)")
    return fs, root, units
