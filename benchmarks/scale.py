"""Web scale, measured: pseudo-labelling N small images from img2dataset-style parquet shards.

For each N (default 10k, 50k, 200k) it writes N small JPEGs as parquet shards (``key``, ``jpg``,
``status`` columns, ``--shard-rows`` rows each; local disk, or S3 through a moto server that this
script starts), then runs, each in a fresh driver process with a local Ray:

  decode   read + decode + resize only (Ray Data tasks, no model): the CPU limit of the machine;
  label    ``run_pseudo_label`` end to end (backbone + NCut + IPO, parquet parts out);
  resume   ``run_pseudo_label`` again into the finished output (all N keys done: nothing to do).

It reports rows/s, peak RSS of the driver and of any one worker process (psutil, sampled every
50 ms over the driver's process tree: the local Ray's raylet, workers and actors are its
children), and the number and total size of the output parts. Markdown table on stdout (and
``--json``). With ``--resume-copies K`` it also times a resume over K times the largest N
finished keys: that output is made by replicating the largest run's parts with shifted keys
(a resume reads only keys, error kinds and footers), since labelling them would take hours here.

Usage::

    python benchmarks/scale.py                               # 10k, 50k, 200k on local disk
    python benchmarks/scale.py --sizes 2000,10000 --store local,s3
    python benchmarks/scale.py --sizes 200 --store s3 --image-size 32   # smoke run
    python benchmarks/scale.py --sizes 10000,30000 --resume-copies 7     # + resume over 210k
    python benchmarks/scale.py --store local,s3 --s3-sizes 10000      # S3 (moto) at 10k only
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import load_avg  # noqa: E402

BACKBONE = "vit_small_patch16_224.dino"


# --- data --------------------------------------------------------------------------------------

def write_shards(root: str, n: int, *, shard_rows: int, px: int, storage_options) -> list[str]:
    """N synthetic JPEGs (a few distinct scenes, re-encoded cheaply) as img2dataset parquet."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from selfment_dist.io.storage import url_to_fs
    from selfment_dist.data.synthetic import make_scene

    fs, base = url_to_fs(root, storage_options)
    fs.makedirs(base, exist_ok=True)
    palette = []
    for i in range(16):  # 16 distinct scenes: writing N distinct ones costs more than the run
        buf = io.BytesIO()
        Image.fromarray(make_scene((1, i), size=(px, px))[0]).save(buf, "JPEG", quality=85)
        palette.append(buf.getvalue())
    paths = []
    for s, start in enumerate(range(0, n, shard_rows)):
        rows = range(start, min(n, start + shard_rows))
        table = pa.table({"key": [f"{i:09d}" for i in rows],
                          "jpg": [palette[i % len(palette)] for i in rows],
                          "status": ["success"] * len(rows),
                          "width": np.full(len(rows), px, np.int32),
                          "height": np.full(len(rows), px, np.int32)})
        path = f"{base.rstrip('/')}/{s:05d}.parquet"
        with fs.open(path, "wb") as f:
            pq.write_table(table, f, row_group_size=1024)
        paths.append(path)
    return [root.rstrip("/")]


def replicate_output(src: str, dst: str, *, n: int, copies: int) -> None:
    """A finished output of ``n * copies`` keys made from the finished output of ``n`` keys at
    ``src`` (local disk): its parts rewritten ``copies`` times with the keys shifted by ``n`` each
    time, and its manifest. A resume reads only the parts' ``key``/``error_kind`` columns and
    footers, so this measures a resume over that many finished keys without labelling them."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(dst, exist_ok=True)
    shutil.copy(f"{src}/_selfment.json", f"{dst}/_selfment.json")
    parts = sorted(p for p in os.listdir(src) if p.startswith("part-"))
    for c in range(copies):
        for i, name in enumerate(parts):
            table = pq.read_table(f"{src}/{name}")
            keys = [f"{int(k) + c * n:09d}" for k in table.column("key").to_pylist()]
            table = table.set_column(table.schema.get_field_index("key"), "key",
                                     pa.array(keys, pa.string()))
            run = name.split("-")[1]
            pq.write_table(table, f"{dst}/part-{run}-{c * len(parts) + i:06d}.parquet")


# --- one measured run (child process) ----------------------------------------------------------

class PeakRss:
    """Peak RSS of this process and of the largest other process in its tree, sampled.

    Also each process's private memory (RSS less its shared pages): a Ray worker that reads
    batches zero-copy from the object store counts the store's shared-memory pages it touched in
    its RSS, and the raylet (which holds the store) counts every page ever used, so RSS alone
    can grow with the data that flowed through while no process holds more of its own.
    ``worker_name``/``private_name``: which process had the peak.
    """

    def __init__(self, interval: float = 0.05):
        import psutil

        self.me = psutil.Process()
        self.driver = self.worker = self.private = 0
        self.worker_name = self.private_name = ""
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                self.driver = max(self.driver, self.me.memory_info().rss)
                for child in self.me.children(recursive=True):
                    try:
                        mem = child.memory_info()
                        if mem.rss > self.worker:
                            self.worker, self.worker_name = mem.rss, child.name()
                        if mem.rss - mem.shared > self.private:
                            self.private, self.private_name = mem.rss - mem.shared, child.name()
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            time.sleep(self._interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _decode_only(inputs: list[str], image_size: int, storage_options, batch_size: int) -> int:
    import ray

    from selfment_dist.io.sources import enumerate_units
    from selfment_dist.pipeline._internal.decode import read_and_decode

    units = enumerate_units(inputs, storage_options)
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    ds = ds.map_batches(read_and_decode, batch_size=None, zero_copy_batch=True, fn_kwargs={
        "image_size": image_size, "max_pixels": None, "storage_options": storage_options,
        "skip_ref": None, "rows_per_batch": batch_size})
    ds = ds.map_batches(lambda b: {"n": [len(b["key"])]}, batch_format="numpy")
    return int(sum(r["n"] for r in ds.take_all()))


def child(args) -> None:
    import ray

    from selfment_dist.io.storage import url_to_fs

    so = json.loads(args.storage_options) if args.storage_options else None
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    # Imported before the clock starts: importing torch, timm and the pipeline takes seconds
    # (tens of seconds on a busy machine), whatever N is.
    from selfment_dist.pipeline.pseudo_label import run_pseudo_label

    start = time.perf_counter()
    with PeakRss() as rss:
        if args.mode == "decode":
            rows = _decode_only(args.inputs, args.image_size, so, args.batch_size)
            summary = {}
        else:
            summary = run_pseudo_label(args.inputs, args.output, backbone=BACKBONE,
                                       weights="random", image_size=args.image_size,
                                       batch_size=args.batch_size, storage_options=so,
                                       progress=False)
            rows = summary["images"] if args.mode == "label" else summary["skipped"]
    wall = time.perf_counter() - start
    out = {"mode": args.mode, "rows": rows, "wall_s": round(wall, 2),
           "rows_per_s": round(rows / wall, 1), "driver_peak_mb": round(rss.driver / 2**20),
           "worker_peak_mb": round(rss.worker / 2**20), "worker_peak_name": rss.worker_name,
           "private_peak_mb": round(rss.private / 2**20), "private_peak_name": rss.private_name}
    if args.mode != "decode":
        fs, root = url_to_fs(args.output, so)
        fs.invalidate_cache()
        sizes = [fs.size(p) for p in fs.ls(root, detail=False)
                 if p.rsplit("/", 1)[-1].startswith("part-")]
        out.update(parts=len(sizes), parts_kb=round(sum(sizes) / 2**10, 1),
                   rows_total=summary["rows_total"], errors_total=summary["errors_total"])
    ray.shutdown()
    print("RESULT " + json.dumps(out), flush=True)


def _run_child(mode: str, inputs: list[str], output: str, args, so) -> dict:
    cmd = [sys.executable, __file__, "_child", "--mode", mode, "--output", output,
           "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
           "--num-cpus", str(args.num_cpus), "--storage-options", json.dumps(so) if so else "",
           "--inputs", *inputs]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{mode} run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# --- driver ------------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,50000,200000")
    p.add_argument("--store", default="local", help="local, s3 or local,s3")
    p.add_argument("--s3-sizes", help="the sizes to run on S3 (default: --sizes); moto serves "
                   "every byte from one Python process, so its largest runs mostly time moto")
    p.add_argument("--shard-rows", type=int, default=1_000)
    p.add_argument("--px", type=int, default=48, help="side of the stored JPEGs")
    p.add_argument("--image-size", type=int, default=32, help="model input size")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    p.add_argument("--timeout", type=float, default=3 * 3600)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--resume-copies", type=int, default=0,
                   help="also time a resume over K x the largest N finished keys (local disk), "
                        "its output made by replicating the largest run's parts with new keys")
    args = p.parse_args()

    results, replicated = [], []
    stores = args.store.split(",")
    server = None
    work = Path(tempfile.mkdtemp(prefix="selfment-scale-"))
    print(f"load average at start: {load_avg()}; {os.cpu_count()} CPUs; work dir {work}",
          file=sys.stderr)
    for store in stores:
        so = None
        if store == "s3":
            from moto.server import ThreadedMotoServer
            import boto3

            if server is None:
                import logging

                logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request
                server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
                server.start()
            host, port = server.get_host_and_port()
            os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
            os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
            endpoint = f"http://{host}:{port}"
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
                Bucket="scale")
            so = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
        sizes = args.s3_sizes if store == "s3" and args.s3_sizes else args.sizes
        for n in (int(s) for s in sizes.split(",")):
            base = f"s3://scale/{n}" if store == "s3" else str(work / str(n))
            t0 = time.perf_counter()
            inputs = write_shards(f"{base}/shards", n, shard_rows=args.shard_rows, px=args.px,
                                  storage_options=so)
            print(f"{store} N={n}: shards written in {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr)
            row = {"store": store, "n": n}
            for mode in ("decode", "label", "resume"):
                res = _run_child(mode, inputs, f"{base}/labels", args, so)
                print(f"  {mode}: {res}", file=sys.stderr)
                row[mode] = res
            results.append(row)
        if args.resume_copies > 1 and store == "local":
            n = max(int(x) for x in args.sizes.split(","))
            big = n * args.resume_copies
            base = str(work / f"{big}-replicated")
            inputs = write_shards(f"{base}/shards", big, shard_rows=args.shard_rows, px=args.px,
                                  storage_options=None)
            replicate_output(str(work / str(n) / "labels"), f"{base}/labels", n=n,
                             copies=args.resume_copies)
            res = _run_child("resume", inputs, f"{base}/labels", args, None)
            print(f"  resume over {big} keys (the {n}-key output replicated): {res}",
                  file=sys.stderr)
            replicated.append({"store": store, "n": big, "resume": res})
    if server is not None:
        server.stop()
    print(f"load average at end: {load_avg()}", file=sys.stderr)

    print("| store | N | decode-only rows/s | pipeline rows/s | pipeline / decode | driver peak MB"
          " | worker peak RSS MB | worker peak private MB | resume s | resume driver MB | parts"
          " | parts KB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        d, lab, res = r["decode"], r["label"], r["resume"]
        print(f"| {r['store']} | {r['n']:,} | {d['rows_per_s']:.0f} | {lab['rows_per_s']:.0f} | "
              f"{lab['rows_per_s'] / d['rows_per_s']:.2f} | {lab['driver_peak_mb']} | "
              f"{lab['worker_peak_mb']} ({lab['worker_peak_name']}) | "
              f"{lab['private_peak_mb']} ({lab['private_peak_name']}) | "
              f"{res['wall_s']:.1f} | {res['driver_peak_mb']} | "
              f"{lab['parts']} | {lab['parts_kb']} |")
    for r in replicated:
        res = r["resume"]
        print(f"\nResume over {r['n']:,} finished keys ({res['parts']} parts, made by replicating "
              f"the largest output): {res['wall_s']:.1f} s, driver peak {res['driver_peak_mb']} "
              f"MB, worker peak {res['worker_peak_mb']} MB")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": results, "replicated_resume": replicated},
                                              indent=2))


def _child_main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("_child")
    p.add_argument("--mode", choices=["decode", "label", "resume"])
    p.add_argument("--inputs", nargs="+")
    p.add_argument("--output")
    p.add_argument("--image-size", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--num-cpus", type=int)
    p.add_argument("--storage-options", default="")
    child(p.parse_args())


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        _child_main()
    else:
        main()
