"""What every Ray Jobs entrypoint shares: its arguments, the YAML config, one stage's run.

The config is the ``selfment`` command line's format (:mod:`selfment_dist.config`): top-level
keys (``address``, ``storage_options``) apply to every stage, a section per stage
(``pseudo_label``, ``train``, ``segment``, ``evaluate``) to that stage only, and ``pipeline:``
holds the chain's own settings. Option names are the fields of the stage's settings model
(:mod:`selfment_dist.settings`: names, types, ranges and defaults are declared there), also
spelt like the command line's flags (``input``, ``format``). Each stage's settings are resolved
and wired by the stage chain (:mod:`selfment_dist.pipeline.chain`), exactly as ``selfment run``
and ``selfment <stage> --config`` do.

The entrypoints run as scripts (``python jobs/<stage>.py``), so this module is imported as
``_common`` from the script's folder.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Callable

from selfment_dist.config import load_config
from selfment_dist.errors import SelfmentUserError
from selfment_dist.io.storage import parse_storage_options
from selfment_dist.pipeline.chain import (chain_settings, stage_function, stage_settings,
                                          write_synthetic)
from selfment_dist.stages import CHAIN

#: The stages with an entrypoint ``jobs/<stage>.py``: the chain's, from the stage registry.
STAGES = tuple(CHAIN)

__all__ = ["STAGES", "parse_args", "load_config", "print_summary", "run_stage"]

logger = logging.getLogger("selfment_dist.jobs")


def parse_args(description: str, argv: list[str] | None = None,
               extra: Callable[[argparse.ArgumentParser], None] | None = None
               ) -> argparse.Namespace:
    """``--config FILE.yaml`` (required), ``--storage-option KEY=VALUE`` (repeatable, wins over
    the config's ``storage_options``), ``--log-level``; ``extra`` adds a script's own flags."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, metavar="FILE.yaml",
                        help="YAML config: local path or fsspec URL (relative paths are relative "
                             "to the job's working directory)")
    parser.add_argument("--storage-option", dest="storage_options", action="append",
                        default=[], metavar="KEY=VALUE",
                        help="fsspec option for every URI, e.g. endpoint_url=http://127.0.0.1:9000 "
                             "(repeatable; also used to read --config)")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING …")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    args.storage_options = parse_storage_options(args.storage_options)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args


def print_summary(summary: Any) -> None:
    """The result as JSON on stdout: the last thing in the job's logs (``ray job logs``)."""
    print(json.dumps(summary, indent=2, default=str), flush=True)


def run_stage(stage: str, argv: list[str] | None = None) -> int:
    """``main`` of a one-stage entrypoint: the stage's settings from the config, then its run."""
    args = parse_args(f"Ray Jobs entrypoint: `{stage}` from a YAML config "
                      f"(section `{stage}:` over the top-level keys).", argv)
    try:
        config = load_config(args.config, args.storage_options)
        settings = stage_settings(config, stage)
        synthetic = chain_settings(config).synthetic
    except SelfmentUserError as err:  # settings, an unreadable config …; bugs keep their traceback
        for problem in getattr(err, "problems", None) or [err]:
            logger.error("%s: %s", args.config, problem)
        return 2
    write_synthetic(synthetic, config.get("storage_options"))  # pipeline.synthetic's scenes
    logger.info("%s settings: %s", stage, settings.record())
    try:
        summary = stage_function(stage)(settings)
    except SelfmentUserError as err:  # checks needing more than the model (a backbone's patch size)
        for problem in getattr(err, "problems", None) or [err]:
            logger.error("%s: %s", stage, problem)
        return 2
    print_summary(summary)
    return 0 if not (isinstance(summary, dict) and summary.get("failed")) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit("jobs/_common.py is a helper module; run jobs/<stage>.py or jobs/pipeline.py")
