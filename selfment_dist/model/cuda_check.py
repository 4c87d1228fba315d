"""``python -m selfment_dist.model.cuda_check``: fail loudly when torch cannot use this node's GPUs.

GPU nodes run it at start-up (cluster/aws-gpu.yaml, cluster/kuberay/*.yaml): a node whose NVIDIA
driver is older than the torch CUDA build needs, or whose container has no GPU, would otherwise
join the cluster and run the model actors on CPU. Exit status 0 when every visible GPU answers a
small matmul, 1 otherwise; one line per GPU on stdout.
"""
from __future__ import annotations

import sys


def main() -> int:
    import torch

    build = torch.version.cuda
    print(f"torch {torch.__version__}, CUDA build {build}")
    if not torch.cuda.is_available():
        print("ERROR: torch.cuda.is_available() is False: no GPU in this container, or the NVIDIA "
              f"driver is too old for the CUDA {build} build of torch (CUDA 13 needs driver "
              ">= 580 and a GPU of compute capability >= 7.5)", file=sys.stderr)
        return 1
    for i in range(torch.cuda.device_count()):
        name = torch.cuda.get_device_name(i)
        cap = torch.cuda.get_device_capability(i)
        x = torch.ones(64, 64, device=f"cuda:{i}")
        ok = float((x @ x)[0, 0]) == 64.0
        print(f"cuda:{i} {name} sm_{cap[0]}{cap[1]} matmul {'ok' if ok else 'WRONG'}")
        if not ok:
            return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
