#!/usr/bin/env bash
# GPU readiness check and first figures, on one GPU node, in under 5 minutes.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # from the repository root, project installed
#
# 1. torch sees the GPU(s) (python -m selfment_dist.model.cuda_check), nvidia-smi sampled throughout:
#    the run fails if no GPU was ever busy.
# 2. NCut + IPO benchmark with --device cuda (48x48 grid = 768 px at patch 16).
# 3. pseudo-label (pipeline vs backbone forward alone), train (2 workers when 2 GPUs exist,
#    stored features vs forward alone) and segment, on synthetic images at 768 px, random weights
#    (no download): images/s printed next to backbone-only images/s.
# Markdown and logs go to OUT_DIR (default: ./gpu_check-<date>).
set -euo pipefail

OUT=${1:-gpu_check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
SIZE=768
BACKBONE=vit_small_patch16_dinov3.lvd1689m

echo "== 1. CUDA visible to torch"
python -m selfment_dist.model.cuda_check | tee "$OUT/cuda_check.txt"
NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
WORKERS=$(( NGPU >= 2 ? 2 : 1 ))
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv | tee "$OUT/gpus.csv"
nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used --format=csv,noheader,nounits \
    -l 1 > "$OUT/gpu_usage.csv" &
SMI=$!
trap 'kill $SMI 2>/dev/null || true' EXIT

echo "== 2. NCut + IPO on the GPU"
python benchmarks/ncut.py --device cuda --grids 48 --images 64 | tee "$OUT/ncut.md"

echo "== 3a. pseudo-label: pipeline vs backbone forward alone ($SIZE px)"
python benchmarks/pseudo_label.py --n 256 --n-published 8 --batch-size 32 --image-size $SIZE \
    --backbone $BACKBONE --skip-memory --output "$OUT/pseudo_label.md" > "$OUT/pseudo_label.log"
cat "$OUT/pseudo_label.md"

echo "== 3b. train: $WORKERS worker(s), one GPU each, vs forward alone ($SIZE px)"
python benchmarks/train.py --use-gpu --workers $WORKERS --n 64 --batch-size 8 --epochs 2 \
    --epochs-backbone 1 --n-published 2 --n-forward 32 --image-size $SIZE --backbone $BACKBONE \
    --output "$OUT/train.md" > "$OUT/train.log"
cat "$OUT/train.md"

echo "== 3c. segment ($SIZE px) with a model trained on synthetic pseudo-labels"
python - "$OUT" $SIZE $BACKBONE $WORKERS <<'EOF'
import json, sys, time
out, size, backbone, workers = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
import numpy as np, ray, torch
from selfment_dist.model.backbone import build_backbone
from selfment_dist.pipeline.pseudo_label import run_pseudo_label
from selfment_dist.pipeline.segment import run_segment
from selfment_dist.pipeline.train import run_train
from selfment_dist.data.synthetic import make_scene, write_scenes

write_scenes(f"{out}/seg/data", 128, size=(480, 640))
ray.init(include_dashboard=False, log_to_driver=False)
run_pseudo_label(f"{out}/seg/data/images", f"{out}/seg/labels", backbone=backbone,
                 weights="random", image_size=size, save_features=False, progress=False)
run_train(f"{out}/seg/labels", f"{out}/seg/model", workers=workers, use_gpu=True, epochs=1,
          batch_size=8, features="backbone")
seg = run_segment(f"{out}/seg/model", [f"{out}/seg/data/images"], f"{out}/seg/maps",
                  batch_size=32, progress=False)
ray.shutdown()
bb = build_backbone(backbone, weights="random", image_size=size, device="cuda")
x = np.stack([make_scene((3, i), size=(size, size))[0] for i in range(64)])
bb(x[:8]); torch.cuda.synchronize()
t = time.perf_counter()
for i in range(0, 64, 32):
    bb(x[i:i + 32])
torch.cuda.synchronize()
fwd = 64 / (time.perf_counter() - t)
line = (f"| segment (end to end, 128 images) | {seg['images_per_s']:.1f} images/s | "
        f"backbone forward alone {fwd:.1f} images/s |")
print("| stage | images/s | reference |\n|---|---|---|\n" + line)
json.dump({"segment": seg, "forward_images_per_s": fwd}, open(f"{out}/segment.json", "w"),
          default=str, indent=2)
EOF

kill $SMI 2>/dev/null || true
BUSY=$(awk -F', ' '$3 > 0 {n++} END {print n+0}' "$OUT/gpu_usage.csv")
MAXMEM=$(awk -F', ' '$4 > m {m = $4} END {print m+0}' "$OUT/gpu_usage.csv")
echo "== GPU busy in $BUSY one-second samples; peak memory used ${MAXMEM} MiB (see $OUT/gpu_usage.csv)"
if [ "$BUSY" -eq 0 ]; then
    echo "ERROR: the GPU was never busy: the stages ran on CPU" >&2
    exit 1
fi
echo "== done: $OUT"
