"""Ray Jobs entrypoint for one stage: pseudo-labels → model artifact (Ray Train DDP).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train.py --config jobs/configs/local.yaml

Calls ``selfment_dist.pipeline.train.run_train``
with the config's ``train:`` section over its top-level keys, wired like
jobs/pipeline.py does (see jobs/README.md).
"""
import sys

from _common import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("train"))
