"""Ray Jobs entrypoint: pseudo-label → train → segment → evaluate from one YAML config.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/pipeline.py --config jobs/configs/local.yaml

The same as ``selfment run --config``: the stage chain of
:mod:`selfment_dist.pipeline.chain` (its ``pipeline:`` section: ``output``, the root of this
run; optionally ``stages``, ``synthetic`` and ``force``), writing ``pipeline_summary.json``
under ``pipeline.output`` and skipping the stages recorded there as complete with the same
settings; ``--force`` runs every stage again.
"""
from __future__ import annotations

import logging
import sys

from _common import load_config, parse_args, print_summary

from selfment_dist.cli import add_settings_arguments
from selfment_dist.errors import SelfmentUserError
from selfment_dist.pipeline.chain import plan, run_chain
from selfment_dist.settings import ChainSettings

logger = logging.getLogger("selfment_dist.jobs.pipeline")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(
        "Ray Jobs entrypoint: pseudo-label -> train -> segment -> evaluate from one YAML config.",
        argv, extra=lambda p: add_settings_arguments(p, ChainSettings, ("force",)))
    try:
        config = load_config(args.config, args.storage_options)
        plan(config)
    except SelfmentUserError as err:  # settings, an unreadable config …
        logger.error("%s: %s", args.config, err)
        return 2
    # --force, else the config's pipeline.force
    summary = run_chain(config, config_uri=args.config, force=args.force or None)
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
