"""Ray Jobs entrypoint for one stage: model + images → saliency maps.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/segment.py --config jobs/configs/local.yaml

Calls ``selfment_dist.pipeline.segment.run_segment``
with the config's ``segment:`` section over its top-level keys, wired like
jobs/pipeline.py does (see jobs/README.md).
"""
import sys

from _common import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("segment"))
