"""Re-key the rows of a `kvtool bench --rows` file written before the setup named profiles by their tensors.

Older files named the profile by the sha256 of the whole file, so setting the profile's default policy (which only
rewrites metadata) orphaned every row. This rewrites the setup of each row whose `profile_sha256` is the sha256 of
OLD_PROFILE to that profile's `kvtool.profile.rows_fingerprint` (tensors + the method `heads=<f>` names); results are
untouched. Give it the profile file the rows were made with, e.g.

    git show b0b6cd1:profiles/smollm2-135m-instruct.kv.st > /tmp/old.kv.st
    python benchmarks/rows_rekey.py /tmp/old.kv.st docs/bench-rows/issue11-passkey-stdlib.jsonl
"""
import hashlib
import json
import sys
from pathlib import Path

from kvtool.fileio import atomic_write
from kvtool.profile import rows_fingerprint


def main(old_profile: Path, rows: Path) -> None:
    old = hashlib.sha256(old_profile.read_bytes()).hexdigest()
    fingerprint = rows_fingerprint(old_profile)
    lines, changed = [], 0
    for line in rows.read_text().splitlines():
        item = json.loads(line) if line.strip() else None
        if item and item["setup"].get("profile_sha256") == old:
            setup = {k: v for k, v in item["setup"].items() if k != "profile_sha256"}
            item["setup"] = {"model": setup.pop("model"), **fingerprint, **setup}
            line, changed = json.dumps(item), changed + 1
        lines.append(line)
    text = "\n".join(lines) + "\n"
    atomic_write(rows, lambda tmp: Path(tmp).write_text(text))
    print(f"{changed} of {len(lines)} rows re-keyed to {fingerprint}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
