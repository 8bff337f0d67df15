"""Checks one example client's JSON lines against the data set it was served.

usage: interop_check.py CLIENT OUTPUT.jsonl REGISTER_DIR

The expected answers come from the data set (REGISTER_DIR/sandbox.csv, the
snapshot manifest), not from this file: every sandbox number must be answered
as sandbox.csv says by CheckNumber, BatchCheckNumbers and StreamCheckNumbers;
GetMirrorStatus must report the manifest's as_of, coverage and record count;
the provoked errors must carry google.rpc.BadRequest (both fields named) and
google.rpc.RetryInfo (a positive delay).
"""

import csv
import json
import sys
from pathlib import Path


def main():
    client, output, register = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    lines = [json.loads(l) for l in output.read_text().splitlines() if l.strip()]
    with open(register / "sandbox.csv", newline="") as f:
        expected = sorted(
            (r["phone_number"], r["since"], r["status"], r["no_data_reason"]) for r in csv.DictReader(f))
    manifest = json.loads((register / "snapshot-000001.json").read_text())
    problems = []

    def fail(what):
        problems.append(what)

    for call in ["CheckNumber", "BatchCheckNumbers", "StreamCheckNumbers"]:
        got = sorted(
            (l["phone_number"], l["since"], l["status"], l["no_data_reason"])
            for l in lines if l.get("call") == call and "status" in l)
        if got != expected:
            fail(f"{call}: answers {got}, expected {expected}")

    status = [l for l in lines if l.get("call") == "GetMirrorStatus"]
    want = {
        "data_as_of": manifest["as_of"],
        "coverage_start": manifest["coverage_start"],
        "covered_prefixes": manifest["covered_prefixes"],
        "record_count": manifest["records"],
        "stale": False,
    }
    if len(status) != 1:
        fail(f"GetMirrorStatus: {len(status)} lines")
    else:
        for key, value in want.items():
            # int64/uint64 fields are strings in some languages' JSON
            got = status[0].get(key)
            if got != value and str(got) != str(value):
                fail(f"GetMirrorStatus.{key}: {got!r}, expected {value!r}")

    bad = [l for l in lines if l.get("provoked") == "bad_request"]
    if len(bad) != 1:
        fail(f"bad_request: {len(bad)} lines")
    else:
        fields = sorted(v["field"] for v in bad[0].get("field_violations", []))
        if bad[0].get("code") != "INVALID_ARGUMENT" or fields != ["phone_number", "since"]:
            fail(f"bad_request: {bad[0]}, expected INVALID_ARGUMENT naming phone_number and since")

    retry = [l for l in lines if l.get("provoked") == "retry_info"]
    if len(retry) != 1:
        fail(f"retry_info: {len(retry)} lines")
    else:
        delay = retry[0].get("retry_delay_seconds")
        if retry[0].get("code") != "RESOURCE_EXHAUSTED" or not isinstance(delay, (int, float)) or delay <= 0:
            fail(f"retry_info: {retry[0]}, expected RESOURCE_EXHAUSTED with a positive RetryInfo delay")

    unexpected = [l for l in lines if "unexpected" in l or "error" in l]
    for l in unexpected:
        fail(f"unexpected: {l}")

    checks = 3 * len(expected) + len(want) + 2
    if problems:
        print(f"interop {client}: FAILED", *problems, sep="\n  ")
        sys.exit(1)
    print(f"interop {client}: {checks} checks passed (answers of {len(expected)} sandbox numbers x 3 calls, "
          f"GetMirrorStatus, BadRequest, RetryInfo)")


if __name__ == "__main__":
    main()
