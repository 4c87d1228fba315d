"""Ray Jobs entrypoint for one stage: images → pseudo-masks (parquet).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/pseudo_label.py --config jobs/configs/local.yaml

Calls ``selfment_dist.pipeline.pseudo_label.run_pseudo_label``
with the config's ``pseudo_label:`` section over its top-level keys, wired like
jobs/pipeline.py does (see jobs/README.md).
"""
import sys

from _common import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("pseudo_label"))
