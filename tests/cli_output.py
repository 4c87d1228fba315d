"""Reading what ``selfment`` prints: its summary is one indented JSON object, and Ray may print
around it on the same stream (worker log lines forwarded to the driver, the autoscaler's
warnings, and through Ray Client the head's own messages)."""
from __future__ import annotations

import json
import re


def printed_summary(stdout: str) -> dict:
    """The last JSON object in ``stdout`` that starts a line (nested objects are indented)."""
    decoder = json.JSONDecoder()
    found = None
    for match in re.finditer(r"^\{", stdout, flags=re.MULTILINE):
        try:
            found, _ = decoder.raw_decode(stdout, match.start())
        except json.JSONDecodeError:
            continue
    assert isinstance(found, dict), f"no summary printed:\n{stdout[-3000:]}"
    return found


def cli_error_lines(argv: list[str], capsys) -> tuple[int, list[str]]:
    """``selfment argv`` in this process: (exit code, the ``selfment:`` and ``Traceback`` lines
    it printed on stderr)."""
    from selfment_dist import cli
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    err = [ln for ln in capsys.readouterr().err.splitlines()
           if ln.startswith("selfment: ") or "Traceback" in ln]
    return code, err
