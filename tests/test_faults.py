"""Issue 30 #4, #5, #8, #11 without Ray: an unreachable endpoint, an unwritable output, a full
disk at the manifest, a missing bucket. Each ends in one line (a SelfmentUserError), fast, and
leaves no stray file. (Whole runs under the same faults: tests/test_hardening_runs.py.)"""
from __future__ import annotations

import errno
import os
import socket
import threading
import time

import fsspec
import pytest

from cli_output import cli_error_lines

from mounts import read_only_bind
from selfment_dist.errors import SelfmentUserError
from selfment_dist.io import reachability
from selfment_dist.io.output_access import (MissingBucketError, OutputNotWritableError,
                                            check_output, disk_fault, prepare_output)
from selfment_dist.pipeline._internal import manifest as manifests
from selfment_dist.pipeline._internal.manifest import MANIFEST_NAME, read_manifest, write_manifest


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_cli = cli_error_lines  # (exit code, selfment:/Traceback lines)


@pytest.fixture(autouse=True)
def _fresh_probe_cache(monkeypatch):
    monkeypatch.setattr(reachability, "_reached", set())


# -- 4: an unreachable endpoint -----------------------------------------------------------------

@pytest.mark.parametrize("side", ["input", "output"])
def test_unreachable_endpoint_is_one_line_naming_it_within_seconds(tmp_path, capsys, side):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    (tmp_path / "in").mkdir()
    local_in, local_out = str(tmp_path / "in"), str(tmp_path / "out")
    src, dst = ("s3://bucket/in", local_out) if side == "input" else (local_in, "s3://bucket/o")
    start = time.monotonic()
    code, err = _cli(["pseudo-label", "--input", src, "--output", dst, "--weights", "random",
                      "--image-size", "64", "--storage-option", f"endpoint_url={endpoint}",
                      "--storage-option", "key=AKIASECRETKEY", "--storage-option",
                      "secret=verysecretvalue"], capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("selfment: error: cannot reach the storage endpoint " + endpoint)
    assert "SECRET" not in err[0].upper()
    assert time.monotonic() - start < reachability.bound_s() + 5
    assert not os.path.exists(local_out)


def test_an_endpoint_that_never_answers_costs_the_stated_bound(monkeypatch):
    """A server that accepts connections but never answers (a black hole): bounded by
    ATTEMPTS × CONNECT_TIMEOUT_S plus the back-off."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    monkeypatch.setattr(reachability, "CONNECT_TIMEOUT_S", 0.3)
    monkeypatch.setattr(reachability, "BACKOFF_S", (0.05, 0.05))
    port = server.getsockname()[1]
    start = time.monotonic()
    try:
        with pytest.raises(reachability.StorageUnreachableError, match="no answer within"):
            reachability.check_reachable("s3://b/x", {"endpoint_url": f"http://127.0.0.1:{port}"})
    finally:
        stop.set()
        thread.join()
        server.close()
        for conn in held:
            conn.close()
    took = time.monotonic() - start
    assert reachability.bound_s() - 0.2 <= took <= reachability.bound_s() + 1.0


def test_a_reachable_endpoint_is_asked_once(s3_server, monkeypatch):
    asked = []
    real = reachability._ask
    monkeypatch.setattr(reachability, "_ask", lambda *a: asked.append(a) or real(*a))
    for _ in range(3):
        reachability.check_reachable(["s3://b/x", "s3://c/y"], {"endpoint_url": s3_server})
    reachability.check_reachable("/local/path", None)  # not probed
    assert len(asked) == 1


# -- 5: an unwritable output --------------------------------------------------------------------

@pytest.fixture
def read_only_dir(tmp_path):
    (tmp_path / "src").mkdir()
    with read_only_bind(tmp_path / "src", tmp_path / "ro") as ro:
        yield ro


def test_a_read_only_output_is_refused_before_anything_is_written(read_only_dir):
    fs, root = fsspec.core.url_to_fs(str(read_only_dir / "out"))
    with pytest.raises(OutputNotWritableError, match="read-only file system"):
        prepare_output(fs, root, str(read_only_dir / "out"))
    (read_only_dir.parent / "src" / "out").mkdir()  # exists already: still refused
    with pytest.raises(OutputNotWritableError, match="read-only file system"):
        prepare_output(fs, root, str(read_only_dir / "out"))
    assert os.listdir(read_only_dir / "out") == []


def test_an_output_under_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    fs, root = fsspec.core.url_to_fs(str(tmp_path / "file" / "out"))
    with pytest.raises(OutputNotWritableError, match="cannot write to the output"):
        prepare_output(fs, root, str(tmp_path / "file" / "out"))


def test_the_output_check_before_ray_refuses_alike_and_creates_nothing(tmp_path,
                                                                         read_only_dir):
    """check_output (pseudo-label and segment, before Ray starts): prepare_output's refusals,
    with nothing created, so a run that fails later (its plan, say) leaves no trace."""
    (tmp_path / "file").write_text("x")
    cases = {str(tmp_path / "file"): "a file of that name is in the way",
             str(tmp_path / "file" / "a" / "out"): "a parent of it is a file",
             str(read_only_dir / "new" / "out"): "read-only file system"}
    for output, reason in cases.items():
        fs, root = fsspec.core.url_to_fs(output)
        with pytest.raises(OutputNotWritableError, match=reason):
            check_output(fs, root, output)
    fine = tmp_path / "not" / "yet" / "out"
    check_output(*fsspec.core.url_to_fs(str(fine)), str(fine))
    assert not (tmp_path / "not").exists()


# -- 8: a full disk at the manifest -------------------------------------------------------------

def _full_disk_for_new_files(monkeypatch, fs):
    """A disk with no free block: creating a file works, writing to a new one fails ENOSPC
    (what ext4/tmpfs do); overwriting blocks a file already has still works."""
    real_open = fs.open

    class Full:
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    def full_open(path, mode="rb", **kw):
        if ".tmp-" in path and "w" in mode:
            real_open(path, "wb").close()  # the file appears (0 bytes), its data does not
            return Full()
        return real_open(path, mode, **kw)
    monkeypatch.setattr(fs, "open", full_open)


def test_a_full_disk_still_records_the_failure_and_leaves_no_temp_file(tmp_path, monkeypatch):
    fs, root = fsspec.core.url_to_fs(str(tmp_path))
    write_manifest(fs, root, {"status": "running", "runs": [{"run_id": "a"}]})
    _full_disk_for_new_files(monkeypatch, fs)
    failed = {"status": "failed", "runs": [{"run_id": "a", "status": "failed",
                                            "reason": "OSError: [Errno 28] No space left"}]}
    write_manifest(fs, root, failed)  # in place, within the room the manifest keeps
    assert sorted(os.listdir(tmp_path)) == [MANIFEST_NAME]
    assert read_manifest(fs, root) == failed
    huge = {"status": "failed", "blob": "x" * (2 * manifests.MANIFEST_SLACK)}
    with pytest.raises(OSError) as info:
        write_manifest(fs, root, huge)  # no room: the error stands, and still no temp file
    assert info.value.errno == errno.ENOSPC
    assert sorted(os.listdir(tmp_path)) == [MANIFEST_NAME]
    assert read_manifest(fs, root) == failed
    fault = disk_fault(RuntimeError("wrapped"), "out")
    assert fault is None
    wrapped = RuntimeError("task failed")
    wrapped.cause = info.value  # how Ray's task errors carry the original
    fault = disk_fault(wrapped, "out")
    assert isinstance(fault, SelfmentUserError) and "no space left on device" in str(fault)


def test_stale_manifest_temp_files_are_removed_at_start(tmp_path):
    stale = tmp_path / f"{MANIFEST_NAME}.tmp-deadbeef"
    fresh = tmp_path / f"{MANIFEST_NAME}.tmp-0badf00d"  # another run's write in flight
    stale.write_text("")
    fresh.write_text("")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    fs, root = fsspec.core.url_to_fs(str(tmp_path))
    prepare_output(fs, root, str(tmp_path), manifest=MANIFEST_NAME)
    assert sorted(os.listdir(tmp_path)) == [fresh.name]


# -- 11: a missing bucket -----------------------------------------------------------------------

def test_a_missing_bucket_is_refused_unless_asked_for(s3_bucket):
    bucket, storage = s3_bucket
    fs, root = fsspec.core.url_to_fs(f"s3://{bucket}-typo/out", **storage)
    with pytest.raises(MissingBucketError, match=f"{bucket}-typo.*--create-bucket"):
        prepare_output(fs, root, f"s3://{bucket}-typo/out")
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}-typo")
    prepare_output(fs, root, f"s3://{bucket}-typo/out", create_bucket=True)
    fs.invalidate_cache()
    assert fs.exists(f"{bucket}-typo")
    fs2, root2 = fsspec.core.url_to_fs(f"s3://{bucket}/out", **storage)
    prepare_output(fs2, root2, f"s3://{bucket}/out")  # an existing bucket needs no flag
    fs3, root3 = fsspec.core.url_to_fs(f"s3://{bucket}-typo2/out", **storage)
    with pytest.raises(MissingBucketError):  # the check before Ray starts: the same refusal
        check_output(fs3, root3, f"s3://{bucket}-typo2/out")
    check_output(fs3, root3, f"s3://{bucket}-typo2/out", create_bucket=True)  # made later
    fs3.invalidate_cache()
    assert not fs3.exists(f"{bucket}-typo2")
