"""The shipped ``jobs/configs/s3.yaml`` as a user runs it, scaled down to this machine.

The file is loaded as a user would: their bucket in place of ``my-bucket``, the store's endpoint
given as a storage option (``--storage-option endpoint_url=...``) and the credentials from the
environment (never from the file). Only the scale is turned down: random weights instead of the
hub, tiny images, CPU instead of GPUs and one model replica per stage, one epoch, one of the five
benchmarks. Everything else (the backbone, the stages and how they are wired, the training
features recomputed from the images on S3, the benchmark layout) is the file's own.
"""
from __future__ import annotations

import json
from pathlib import Path

import fsspec

from selfment_dist.config import load_config
from selfment_dist.data.synthetic import write_scenes

S3_CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "s3.yaml"
N_IMAGES, N_BENCH, SIZE = 6, 2, (48, 64)
KEPT_BENCHMARKS = ("ECSSD",)  # each benchmark is one more segment run
# What this machine cannot do at the file's scale: every other setting is the file's.
SCALE_DOWN = {
    # One model replica per stage: the file's "one per GPU" has no match on CPU nodes, and
    # spreading over nodes is what test_multinode's node-loss tests check.
    "pseudo_label": {"weights": "random", "image_size": 64, "batch_size": 4,
                     "num_gpus_per_actor": None, "num_actors": 1},
    # Every row is trained on by default (random weights flag most masks no_object).
    "train": {"workers": 1, "use_gpu": False, "resources_per_worker": None, "epochs": 1,
              "batch_size": 2},
    "segment": {"image_size": 64, "batch_size": 4, "num_gpus_per_actor": None, "num_actors": 1},
    "evaluate": {"image_size": 64, "num_gpus_per_actor": None, "num_actors": 1},
}


def s3_config_scaled_down(prefix: str, endpoint_url: str, work: Path) -> dict:
    """The shipped file with ``s3://my-bucket/`` → ``prefix`` (e.g. ``s3://bucket/``) and the
    endpoint as a storage option, loaded and scaled down; ``work`` is a local scratch folder."""
    text = S3_CONFIG.read_text()
    assert "s3://my-bucket/" in text
    mine = work / "s3.yaml"
    mine.write_text(text.replace("s3://my-bucket/", prefix))
    config = load_config(str(mine), {"endpoint_url": endpoint_url})
    assert config["storage_options"] == {"endpoint_url": endpoint_url}
    for stage, values in SCALE_DOWN.items():
        for key, value in values.items():
            if value is None:
                config[stage].pop(key, None)
            else:
                config[stage][key] = value
    config["evaluate"]["benchmarks"] = {name: config["evaluate"]["benchmarks"][name]
                                        for name in KEPT_BENCHMARKS}
    return config


def put_the_data_where_the_file_expects_it(config: dict, storage: dict, work: Path) -> None:
    """Synthetic scenes at the file's image folder and at each kept benchmark's folders."""
    fs = fsspec.filesystem("s3", **storage)
    [images] = config["pseudo_label"]["inputs"]
    write_scenes(str(work / "corpus"), N_IMAGES, size=SIZE)
    fs.put(str(work / "corpus" / "images") + "/", images.rstrip("/"), recursive=True)
    for name, (bench_images, bench_masks) in config["evaluate"]["benchmarks"].items():
        local = work / name
        write_scenes(str(local), N_BENCH, size=SIZE, seed=1)
        fs.put(str(local / "images") + "/", bench_images, recursive=True)
        fs.put(str(local / "masks") + "/", bench_masks, recursive=True)


def check_the_run(config: dict, summary: dict, storage: dict) -> None:
    """Every stage complete, every output on S3 where the file says."""
    run = config["pipeline"]["output"]
    assert summary["status"] == "complete", summary
    assert {s: r["status"] for s, r in summary["stages"].items()} == dict.fromkeys(
        ["pseudo_label", "train", "segment", "evaluate"], "complete")
    stages = {s: r["summary"] for s, r in summary["stages"].items()}
    assert stages["pseudo_label"]["rows_total"] == N_IMAGES
    assert stages["train"]["feature_source"] == "backbone"  # the file's `features: backbone`
    assert stages["train"]["steps"] == N_IMAGES // 2
    assert stages["segment"]["maps_total"] == N_IMAGES
    assert set(summary["metrics"]) == set(KEPT_BENCHMARKS)
    assert all(m["n_images"] == N_BENCH for m in summary["metrics"].values())
    fs = fsspec.filesystem("s3", **storage)
    fs.invalidate_cache()
    for name in ("labels/_selfment.json", "model/model.json", "model/head.safetensors",
                 "predictions/_segment.json", "report/metrics.json",
                 "pipeline_summary.json"):
        assert fs.exists(f"{run}/{name}"), name
    assert len(fs.glob(f"{run}/predictions/*.png")) == N_IMAGES
    for name in KEPT_BENCHMARKS:
        assert len(fs.glob(f"{run}/report/predictions/{name}/*.png")) == N_BENCH
    meta = json.loads(fs.cat(f"{run}/model/model.json"))
    assert meta["backbone"] == config["pseudo_label"]["backbone"]
