"""Load time of the embedded model: first load (converts the GGUF, fills the cache) vs a second load (cache hit).

    python benchmarks/load_time.py

Each load runs in a fresh Python process with an empty temporary KVTOOL_CACHE at first; the time is
`kvtool.load_model()` alone, imports excluded, as a user pays it at the start of every command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

CHILD = """
import json, time
import kvtool
t = time.perf_counter()
kvtool.load_model()
print(json.dumps({"seconds": time.perf_counter() - t}))
"""


def one_load(cache: str) -> float:
    env = dict(os.environ, KVTOOL_CACHE=cache, PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["seconds"]


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        first = one_load(cache)
        second = one_load(cache)
    print(f"first load (GGUF conversion + cache write): {first:.1f} s")
    print(f"second load (cached safetensors):           {second:.1f} s")


if __name__ == "__main__":
    main()
