"""evaluate folds records into running sums as shards arrive: the scores, curves and per-image
rows are bit for bit those of merging every record at once, and the driver keeps a few hundred
bytes per image instead of the whole record."""
from __future__ import annotations

import pickle
import tracemalloc

import numpy as np

from selfment_dist.evaluation.metrics import image_record, merge_curves, merge_records, record_summary
from selfment_dist.pipeline._internal.eval_merge import RecordStream


def _pairs(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = 24 + i % 5, 30 + i % 3
        gt = np.zeros((h, w), np.uint8)
        gt[h // 4: 3 * h // 4, w // 5: w // 2 + i % 7] = 255
        pred = np.clip(gt * rng.uniform(0.2, 1.0) + rng.normal(0, 40, (h, w)), 0, 255)
        if i % 9 == 4:
            pred = np.zeros_like(pred)  # an empty prediction
        out.append((pred.astype(np.uint8), gt))
    return out


def test_stream_equals_merging_all_records_bit_for_bit():
    records = [image_record(p, g) for p, g in _pairs(37)]
    stream = RecordStream()
    for i, r in enumerate(records):
        stream.add(f"k{i:03d}", r)
    assert stream.scores() == merge_records(records)
    want, got = merge_curves(records), stream.curves()
    for protocol in want:
        assert want[protocol].keys() == got[protocol].keys()
        for name in want[protocol]:
            assert np.array_equal(want[protocol][name], got[protocol][name]), (protocol, name)
    rows = stream.per_image()
    assert len(rows) == 37 and rows[-1][0] == "k036"
    assert list(rows) == [(f"k{i:03d}", record_summary(r)) for i, r in enumerate(records)]


def test_driver_keeps_a_few_hundred_bytes_per_image():
    record = image_record(*_pairs(1)[0])
    assert len(pickle.dumps(record)) > 10_000          # what used to stay per image
    stream = RecordStream()
    stream.add("warm/000000", record)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    n = 2000
    for i in range(n):
        stream.add(f"some/key/{i:06d}", record)
    per_image = (tracemalloc.get_traced_memory()[0] - before) / n
    tracemalloc.stop()
    assert per_image < 400, per_image
