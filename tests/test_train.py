"""Ray Train (DDP) training of the head: learning, real DDP, fault tolerance, re-runs, S3.

Pseudo-labels are written here following the data contract (no pseudo-label pipeline run):
- ``feature_labels``: DINO-like synthetic patch features (grid 8x8, C=384) whose pseudo-masks come
  from ``pseudo_label`` (NCut + IPO), stored in the ``features`` column; two error rows.
- image labels (S3 test): synthetic scenes at 64 px, labelled with a random-weights backbone;
  training recomputes their features with the backbone inside the workers.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from selfment_dist import PatchHead, pseudo_label, selfment_loss
from selfment_dist.model.artifact import load_artifact
from selfment_dist.model.backbone import DEFAULT_BACKBONE
from selfment_dist.io.masks import decode_mask, encode_mask
from selfment_dist.io.schema import decode_features, encode_features, error_row, pseudo_label_schema
from selfment_dist.pipeline import train as train_mod
from selfment_dist.pipeline._internal import faults
from selfment_dist.pipeline.train import RUN_NAME, inspect_labels, run_train
from selfment_dist.data.synthetic import make_patch_feature_batch

N_SCENES, GRID, DIM = 48, 8, 384



def _manifest(image_size: int, feature_dim: int | None) -> dict:
    return {"format": "selfment-pseudo-labels", "format_version": 1, "status": "complete",
            "config": {"backbone": DEFAULT_BACKBONE, "weights": "random", "image_size": image_size},
            **({"feature_dim": feature_dim} if feature_dim else {})}


def write_labels(root, rows: list[dict], *, image_size: int, features: bool,
                 storage_options=None, n_parts: int = 2) -> str:
    """Pseudo-label parquet parts + manifest at ``root`` (local path or fsspec URL)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(str(root), **(storage_options or {}))
    fs.makedirs(path, exist_ok=True)
    schema = pseudo_label_schema(features=features)
    for i in range(n_parts):
        part = pa.Table.from_pylist(rows[i::n_parts], schema=schema)
        with fs.open(f"{path}/part-{i:03d}.parquet", "wb") as f:
            pq.write_table(part, f)
    dim = next((len(r["features"]) // (2 * r["grid_h"] * r["grid_w"]) for r in rows
                if features and r.get("features")), None)
    with fs.open(f"{path}/_selfment.json", "w") as f:
        json.dump(_manifest(image_size, dim), f)
    return str(root)


def _row(key, source, mask, feats=None):
    return {"key": key, "source": source, "width": 64, "height": 64, "grid_h": mask.shape[0],
            "grid_w": mask.shape[1], "mask": encode_mask(mask), "fg_fraction": float(mask.mean()),
            "error": None, **({"features": encode_features(feats)} if feats is not None else {})}


def _feature_rows(n: int, seed: int = 0) -> list[dict]:
    feats = make_patch_feature_batch(np.random.default_rng(seed), n, GRID, GRID, DIM)
    feats /= np.linalg.norm(feats, axis=-1, keepdims=True)
    masks = pseudo_label(torch.from_numpy(feats)).numpy()
    return [_row(f"scene_{i:03d}", f"/data/scene_{i:03d}.jpg", masks[i], feats[i]) for i in range(n)]


# Rows the pseudo-labeller flagged no_object (low confidence): the main run skips them with the
# explicit skip_no_object option (the default trains on every row, as the official code; that
# default: tests/test_fidelity.py; which rows real pseudo-labels flag: tests/test_confidence.py).
NO_OBJECT = {1, 6, 11, 14}


@pytest.fixture(scope="module")
def feature_labels(tmp_path_factory):
    """N_SCENES usable rows, the NO_OBJECT rows among them flagged, and two error rows."""
    rows = _feature_rows(N_SCENES + len(NO_OBJECT))
    for i, row in enumerate(rows):
        row.update(confidence=0.1 if i in NO_OBJECT else 0.9, no_object=i in NO_OBJECT)
    rows += [error_row("broken_1", "/data/broken_1.jpg", "not an image"),
             error_row("broken_2", "/data/broken_2.jpg", "truncated JPEG")]
    return write_labels(tmp_path_factory.mktemp("labels") / "labels", rows,
                        image_size=16 * GRID, features=True)


def _load_rows(labels: str, *, flagged: bool = False) -> list[dict]:
    """The rows without error; without the no_object ones unless ``flagged``."""
    table = pq.read_table(labels, columns=["key", "grid_h", "grid_w", "mask", "features", "error",
                                           "no_object"])
    return [r for r in table.to_pylist()
            if r["error"] is None and (flagged or not r["no_object"])]


def _iou(pred: np.ndarray, gt: np.ndarray) -> float:
    union = (pred | gt).sum()
    return 1.0 if union == 0 else float((pred & gt).sum() / union)


TRAIN_KWARGS = dict(workers=2, epochs=14, batch_size=4, checkpoint_every=4, skip_no_object=True)


@pytest.fixture(scope="module")
def trained(ray_local, feature_labels, tmp_path_factory):
    """The main run (the one Ray Train start for the learning, DDP, shuffle, confidence-filter
    and fault-tolerance checks): 2 ranks, 14 epochs x 6 steps of 4 images per rank; a worker
    is killed after step 10 and Ray Train restarts the group from the checkpoint of step 8
    (checkpoints: every 4 steps + epoch ends). Each rank dumps its weights and its batch's keys
    at every step (the step dump of ``faults``). Returns (output, summary, debug folder)."""
    root = tmp_path_factory.mktemp("model")
    output, debug = str(root / "model"), root / "debug"
    with pytest.MonkeyPatch.context() as mp:  # test seams: see pipeline/_internal/faults.py
        mp.setenv(faults.TRAIN_EXIT_AT_STEP_ENV, "10")
        mp.setenv(faults.MARKER_ENV, str(root / "fault-marker"))
        mp.setenv(faults.STEP_DUMP_ENV, str(debug))
        summary = run_train(feature_labels, output, max_failures=1, **TRAIN_KWARGS)
    assert (root / "fault-marker").exists()  # the last rank did exit at step 10
    return output, summary, debug


# ---------------------------------------------------------------------------------------------
# Learning

@pytest.mark.slow
def test_loss_falls_and_error_rows_are_counted(trained):
    _, summary, _ = trained
    assert summary["status"] == "trained"
    assert (summary["rows"], summary["error_rows"], summary["train_rows"]) == (
        N_SCENES + len(NO_OBJECT) + 2, 2, N_SCENES)
    assert summary["low_confidence_rows"] == len(NO_OBJECT)
    history = summary["history"]
    assert [h["epoch"] for h in history] == list(range(1, 15))
    assert all(h["images"] == N_SCENES for h in history)  # counts; keys: the test below
    assert summary["steps"] == 14 * 6  # 24 rows per worker, 4 per step
    first, last = history[0], history[-1]
    assert last["total"] < 0.6 * first["total"]
    assert last["bce"] < first["bce"] and last["dice"] < first["dice"]
    assert summary["feature_source"] == "stored"


@pytest.mark.slow
def test_artifact_loads_and_masks_match_the_pseudo_masks(trained, feature_labels):
    output, summary, _ = trained
    head, meta = load_artifact(output)
    assert (meta["backbone"], meta["weights"], meta["image_size"]) == (DEFAULT_BACKBONE, "random", 128)
    assert (meta["feature_dim"], meta["embed_dim"], meta["in_dim"]) == (DIM, 128, DIM)
    assert meta["training"]["steps"] == summary["steps"]
    assert meta["training"]["history"] == summary["history"]

    ious = []
    for r in _load_rows(feature_labels):
        feats = torch.from_numpy(decode_features(r["features"], r["grid_h"], r["grid_w"]).astype(np.float32))
        pred = (head.saliency(feats) > 0.5).numpy()
        ious.append(_iou(pred, decode_mask(r["mask"], r["grid_h"], r["grid_w"])))
    assert np.mean(ious) >= 0.9, ious


@pytest.mark.slow
def test_checkpoints_are_in_the_output(trained):
    output, _, _ = trained
    names = os.listdir(os.path.join(output, RUN_NAME))
    assert any(n.startswith("checkpoint-step") for n in names), names


@pytest.mark.slow
def test_finished_run_is_returned_without_training(trained, feature_labels, monkeypatch):
    output, summary, _ = trained
    before = os.path.getmtime(os.path.join(output, "model.json"))

    def no_ray(*args, **kwargs):
        raise AssertionError("a finished run must not start Ray")

    monkeypatch.setattr("selfment_dist.pipeline._internal.ray_runtime.ensure_ray", no_ray)
    again = run_train(feature_labels, output, **TRAIN_KWARGS)
    assert again["status"] == "already_done"
    assert again["history"] == summary["history"] and again["steps"] == summary["steps"]
    assert os.path.getmtime(os.path.join(output, "model.json")) == before
    # Fewer epochs than done is finished too; other settings are an error, not a silent mix.
    assert run_train(feature_labels, output, epochs=3, batch_size=4)["status"] == "already_done"
    with pytest.raises(ValueError, match="other settings.*lr"):
        run_train(feature_labels, output, **TRAIN_KWARGS, lr=0.01)


# ---------------------------------------------------------------------------------------------
# DDP, the official shuffle and the confidence filter (the main run's per-step dumps)

@pytest.mark.slow
def test_ddp_is_real_and_every_epoch_sees_every_kept_row_once_in_a_new_order(trained,
                                                                            feature_labels):
    """- DDP is real: after step 1 both ranks hold the same weights, and the step used both
      shards (it equals one step on all 8 images; equal shards, so the mean of the two ranks'
      gradients) and differs from a step on one shard alone.
    - The official schedule's full shuffle, checked on the keys each rank trained on: every
      epoch covers every usable row exactly once, and the order changes from epoch to epoch.
      (Epoch 2 is left out: the restart after step 10 resumed it mid-way, in a new order.)
    - The skip_no_object filter, end to end: the rows flagged ``no_object`` are never
      trained on.
    """
    _, summary, debug = trained
    assert summary["shuffle"] == "full"
    rows = {r["key"]: r for r in _load_rows(feature_labels, flagged=True)}
    kept = sorted(k for k, r in rows.items() if not r["no_object"])
    assert len(kept) == N_SCENES and len(rows) == N_SCENES + len(NO_OBJECT)

    # DDP, on step 1.
    ranks = [load_file(debug / f"rank{r}-step1.safetensors") for r in (0, 1)]
    shards = [json.loads((debug / f"rank{r}-step1.json").read_text()) for r in (0, 1)]
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    assert len(shards[0]) == len(shards[1]) == 4 and not set(shards[0]) & set(shards[1])

    def one_step(keys):
        feats = torch.stack([torch.from_numpy(decode_features(rows[k]["features"], GRID, GRID)
                                              .astype(np.float32)).reshape(-1, DIM) for k in keys])
        masks = torch.stack([torch.from_numpy(decode_mask(rows[k]["mask"], GRID, GRID).reshape(-1))
                             for k in keys])
        torch.manual_seed(0)  # the run's seed (the default): the head's initialisation
        head = PatchHead(DIM, 128)
        opt = torch.optim.Adam(head.parameters(), lr=1e-3, weight_decay=1e-5)
        logits, emb = head(feats)
        selfment_loss(logits, emb, masks)["total"].backward()
        opt.step()
        return head.state_dict()

    single = one_step(shards[0])  # a single worker's step on its shard alone
    both = one_step(shards[0] + shards[1])
    assert any(not torch.allclose(single[k], ranks[0][k], atol=1e-6) for k in single)
    for name in both:
        assert torch.allclose(both[name], ranks[0][name], atol=1e-5), name

    # Every epoch (but the restarted one): every kept row once, none flagged, in a new order.
    orders = []
    for epoch in (0, 2, 3, 13):
        steps = range(epoch * 6 + 1, epoch * 6 + 7)
        seen = [k for s in steps for r in (0, 1)
                for k in json.loads((debug / f"rank{r}-step{s}.json").read_text())]
        assert sorted(seen) == kept, epoch  # once each, none missing, no flagged row
        orders.append(seen)
    assert not (debug / f"rank0-step{14 * 6 + 1}.json").exists()
    assert all(a != b for a, b in zip(orders, orders[1:]))


# ---------------------------------------------------------------------------------------------
# Fault tolerance and resumption

@pytest.mark.slow
def test_killed_worker_resumes_from_checkpoint(trained):
    output, summary, _ = trained
    assert summary["resumed_from_steps"] == [8]  # the latest checkpoint before the failure
    assert summary["steps"] == 14 * 6 and summary["epochs"] == 14
    # Epoch 2 was cut after 4 of its 6 steps and finished from its second step after the restart.
    assert summary["history"][1]["steps"] == 6 and summary["history"][1]["images"] == N_SCENES
    assert not any(n.endswith(".marker") for n in os.listdir(os.path.join(output, RUN_NAME)))


@pytest.mark.slow
def test_more_epochs_continue_from_the_last_checkpoint(trained, feature_labels, tmp_path):
    """A new run on the same output resumes Ray Train's run from storage (V2: same
    storage_path and name) instead of starting over."""
    output, summary, _ = trained
    copy = str(tmp_path / "model")
    shutil.copytree(output, copy)
    more = run_train(feature_labels, copy, **{**TRAIN_KWARGS, "epochs": 15})
    assert more["status"] == "trained"
    assert more["resumed_from_steps"] == [8, 14 * 6]
    assert more["steps"] == 15 * 6 and len(more["history"]) == 15
    assert more["history"][:14] == summary["history"]
    assert load_artifact(copy)[1]["training"]["epochs"] == 15


# ---------------------------------------------------------------------------------------------
# Features from the backbone, everything on S3

@pytest.mark.slow
def test_backbone_features_on_s3(ray_local, s3_bucket):
    import fsspec

    from selfment_dist.model.backbone import build_backbone, resize_square
    from selfment_dist.io.images import decode_image
    from selfment_dist.algorithm.labeler import PseudoLabeler
    from selfment_dist.model.segmenter import Segmenter
    from selfment_dist.data.synthetic import write_scenes

    bucket, so = s3_bucket
    size, n = 64, 16
    keys = write_scenes(f"s3://{bucket}/scenes", n, seed=5, size=(size, size), storage_options=so)
    fs = fsspec.filesystem("s3", **so)
    sources = [f"s3://{bucket}/scenes/images/{k}.jpg" for k in keys]
    images = np.stack([resize_square(decode_image(fs.cat_file(s), max_pixels=None), size)
                       for s in sources])
    masks = PseudoLabeler(build_backbone(DEFAULT_BACKBONE, weights="random", image_size=size,
                                         device="cpu"))(images)["mask"]
    rows = [_row(k, s, m) for k, s, m in zip(keys, sources, masks)]
    labels = write_labels(f"s3://{bucket}/labels", rows, image_size=size, features=False,
                          storage_options=so)

    output = f"s3://{bucket}/model"
    # The official schedule (one image per step): 16 steps per epoch, 32 in all, so "the loss
    # falls" is judged over enough steps. One worker: DDP is the test above's.
    summary = run_train(labels, output, workers=1, epochs=2, storage_options=so)
    assert summary["feature_source"] == "backbone" and summary["feature_dim"] == 384
    assert summary["steps"] == 32
    assert summary["history"][-1]["total"] < summary["history"][0]["total"]
    assert fs.exists(f"{bucket}/model/model.json") and fs.exists(f"{bucket}/model/{RUN_NAME}")

    segmenter = Segmenter.from_artifact(output, storage_options=so, device="cpu")
    assert segmenter.image_size == 2 * size  # the recorded inference size: twice the training size
    segmenter = Segmenter.from_artifact(output, storage_options=so, device="cpu", image_size=size)
    saliency = segmenter.saliency(images[:3])
    assert saliency.shape == (3, size // 16, size // 16)
    # The rebuilt backbone + head give the trained head's softmax on the same features.
    head, _ = load_artifact(output, storage_options=so)
    with torch.no_grad():
        logits, _ = head(segmenter.backbone(images[:3]))
    np.testing.assert_allclose(saliency, torch.softmax(logits, -1)[..., 1].numpy(), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Bad labels: clear errors before any training

def test_missing_labels(tmp_path):
    with pytest.raises(FileNotFoundError, match="no pseudo-labels"):
        run_train(str(tmp_path / "nothing"), str(tmp_path / "model"))


def test_labels_without_manifest(tmp_path):
    (tmp_path / "labels").mkdir()
    pq.write_table(pa.table({"key": ["a"]}), tmp_path / "labels" / "part-0.parquet")
    with pytest.raises(ValueError, match="manifest"):
        inspect_labels(str(tmp_path / "labels"))


def test_empty_and_all_error_labels(tmp_path):
    empty = write_labels(tmp_path / "empty", [], image_size=128, features=False, n_parts=1)
    with pytest.raises(ValueError, match="empty"):
        run_train(empty, str(tmp_path / "model"))
    errors = write_labels(tmp_path / "errors", [error_row("a", "/a.jpg", "bad"),
                                                error_row("b", "/b.jpg", "bad")],
                          image_size=128, features=False)
    with pytest.raises(ValueError, match="all 2 pseudo-label rows .* are errors"):
        run_train(errors, str(tmp_path / "model"))


def test_container_sources_need_stored_features(tmp_path):
    rows = _feature_rows(4)
    for r in rows:
        r["source"] = "/data/shard-000.tar"
    labels = write_labels(tmp_path / "labels", rows, image_size=128, features=True)
    assert inspect_labels(labels).feature_source == "stored"  # fine with stored features
    with pytest.raises(ValueError, match="--save-features"):
        inspect_labels(labels, features="backbone")


def test_worker_resources_leave_a_cpu_for_data_and_fit_a_node(ray_local):
    # The suite's local Ray: one node of 2 CPUs.
    assert train_mod._plan_workers(2, False, None) == ({"CPU": 0.5}, 1)
    assert train_mod._plan_workers(1, False, None) == ({"CPU": 1.0}, 1)
    assert train_mod._plan_workers(2, False, {"CPU": 3}) == ({"CPU": 3}, 3)
    # Sized per node: a head without CPUs and two 3-CPU workers hold one worker of 3 CPUs,
    # not one of the 5 the cluster's total would give (no node holds it: Ray Train waits
    # forever), and two of 2 CPUs.
    head, worker = {"CPU": 0.0, "memory": 1e9}, {"CPU": 3.0}
    assert train_mod._plan_workers(1, False, None, nodes=[head, worker, worker]) == (
        {"CPU": 3.0}, 3)
    assert train_mod._plan_workers(2, False, None, nodes=[head, worker, worker]) == (
        {"CPU": 2.0}, 2)
    assert train_mod._plan_workers(4, False, None, nodes=[worker, worker]) == ({"CPU": 1.0}, 1)
    assert train_mod._plan_workers(1, False, None, nodes=[{"CPU": 2.0}] * 4) == (
        {"CPU": 2.0}, 2)
    # GPU workers: Ray Train's default (one GPU each), whatever the nodes.
    assert train_mod._plan_workers(2, True, None, nodes=[{"CPU": 8.0, "GPU": 1.0}]) == (
        None, None)


def test_workers_no_node_can_hold_fail_in_bounded_time_unless_nodes_arrive(monkeypatch):
    """Ray Train retries its worker group's start for as long as it is left running: the
    driver waits at most worker_wait_s for nodes that can hold the workers (an autoscaler may
    add them), then fails naming the resource. (On a real multi-node cluster:
    tests/test_multinode.py.)"""
    from selfment_dist.pipeline._internal import plan as _plan

    head, worker = {"CPU": 0.0}, {"CPU": 3.0}
    nodes = [head, worker, worker]
    assert _plan.workers_that_fit({"CPU": 3.0}, nodes) == 2
    assert _plan.workers_that_fit({"CPU": 4.0}, nodes) == 0
    assert _plan.workers_that_fit({"CPU": 1.0, "GPU": 1.0}, nodes + [{"CPU": 8.0, "GPU": 2.0}]) == 2
    monkeypatch.setattr(_plan, "alive_nodes", lambda: nodes)
    _plan.wait_for_worker_nodes({"CPU": 3.0}, 2, 0.01)  # they fit: no wait
    with pytest.raises(_plan.UnschedulableError,
                       match=r"cannot hold 1 worker.*GPU: 1.*alive nodes have \{CPU: 0\}"):
        _plan.wait_for_worker_nodes({"GPU": 1.0}, 1, 0.2, poll_s=0.05)
    # A GPU node arrives during the wait (an autoscaler): no error.
    calls = iter([nodes, nodes, nodes + [{"CPU": 8.0, "GPU": 1.0}]])
    monkeypatch.setattr(_plan, "alive_nodes", lambda: next(calls))
    _plan.wait_for_worker_nodes({"GPU": 1.0}, 1, 30, poll_s=0.01)


def test_an_unschedulable_run_is_one_line_on_the_command_line(monkeypatch, capsys):
    from selfment_dist import cli
    from selfment_dist.pipeline._internal.plan import UnschedulableError

    def unschedulable(command):
        def run(settings, **_):
            raise UnschedulableError("train: the cluster cannot hold 1 worker(s) within 3 s: "
                                     "each needs {CPU: 4} on one node")
        return run

    monkeypatch.setattr(cli, "_target", unschedulable)
    assert cli.main(["train", "--labels", "l", "--output", "o", "--worker-wait-s", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["selfment: error: train: the cluster cannot hold 1 worker(s) within 3 s: "
                   "each needs {CPU: 4} on one node"]
