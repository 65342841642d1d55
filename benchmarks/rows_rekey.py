"""Re-key the rows of a `kvtool bench --rows` file written before the setup named profiles by their tensors.

Older files named the profile by the sha256 of the whole file, so setting the profile's default policy (which only
rewrites metadata) orphaned every row. This rewrites the setup of each row whose `profile_sha256` is the sha256 of
OLD_PROFILE to that profile's `kvtool.profile.rows_fingerprint` (tensors + the method `heads=<f>` names); results are
untouched. Give it the profile file the rows were made with, e.g.

    git show b0b6cd1:profiles/smollm2-135m-instruct.kv.st > /tmp/old.kv.st
    python benchmarks/rows_rekey.py /tmp/old.kv.st docs/bench-rows/issue11-passkey-stdlib.jsonl

`--added OLD NEW ROWS` carries rows over to a profile that only gained sections: every tensor of OLD must be in NEW,
bit for bit, and the method a bare `heads=<f>` names must not change. A row keyed to OLD moves to NEW unless its spec
names a method whose sections were added (e.g. after `kvtool calibrate --method combo`, rows of `heads=combo:...`
cannot exist for OLD, and any other row read nothing NEW added). Example:

    git show HEAD~1:profiles/smollm2-135m-instruct.kv.st > /tmp/old.kv.st
    python benchmarks/rows_rekey.py --added /tmp/old.kv.st profiles/smollm2-135m-instruct.kv.st ROWS.jsonl
"""
import hashlib
import json
import sys
from pathlib import Path

from kvtool.fileio import atomic_write
from kvtool.profile import Profile, rows_fingerprint


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


def added(old_profile: Path, new_profile: Path, rows: Path) -> None:
    import torch

    old, new = Profile.load(old_profile), Profile.load(new_profile)
    changed = [n for n in old.tensors if n not in new.tensors or not torch.equal(old.tensors[n], new.tensors[n])]
    if changed:
        sys.exit(f"Error: {new_profile} changes or drops {len(changed)} of the old tensors, e.g. {changed[0]}")
    before, after = old.rows_fingerprint(), new.rows_fingerprint()
    if before["profile_method"] != after["profile_method"]:
        sys.exit(f"Error: a bare heads=<f> names {after['profile_method']} in {new_profile}, "
                 f"{before['profile_method']} before")
    methods = {n.split(".")[1] for n in new.tensors if n not in old.tensors and n.startswith("heads.")}
    lines, moved, kept = [], 0, 0
    for line in rows.read_text().splitlines():
        item = json.loads(line) if line.strip() else None
        if item and all(item["setup"].get(k) == v for k, v in before.items()):
            spec = item["result"]["spec"]
            if any(m in spec for m in methods):
                kept += 1
            else:
                item["setup"].update(after)
                line, moved = json.dumps(item), moved + 1
        lines.append(line)
    text = "\n".join(lines) + "\n"
    atomic_write(rows, lambda tmp: Path(tmp).write_text(text))
    print(f"{moved} rows moved to {after}; {kept} left (their spec names an added method: {sorted(methods)})")


if __name__ == "__main__":
    if sys.argv[1] == "--added":
        added(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        main(Path(sys.argv[1]), Path(sys.argv[2]))
