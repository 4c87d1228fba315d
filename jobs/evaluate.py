"""Ray Jobs entrypoint for one stage: saliency maps vs masks → metrics and reports.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/evaluate.py --config jobs/configs/local.yaml

Calls ``selfment_dist.pipeline.evaluate.run_evaluate``
with the config's ``evaluate:`` section over its top-level keys, wired like
jobs/pipeline.py does (see jobs/README.md).
"""
import sys

from _common import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("evaluate"))
