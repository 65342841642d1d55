"""Trace overhead: a plain sdpa forward vs kvtool's profiling forward on the same input, in one run.

    python benchmarks/trace_overhead.py [--seq-len 4096] [--repeat 3] [--model PATH] [--device cpu|cuda] [--json]

Both forwards run the decoder (no lm_head over all positions: profiling only needs the model's attention; it
applies lm_head to the few answer positions it checks). Time is the median of `--repeat` runs after one warm-up.
Peak memory: on CUDA `torch.cuda.max_memory_allocated`; on CPU the process RSS sampled every 2 ms by a thread,
reported both as the absolute peak and as the peak rise above the RSS just before the forward (activations).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import psutil
import torch

import kvtool
from kvtool.data import passkey_samples
from kvtool.trace import TraceConfig, Tracer, _tracing


class PeakRSS:
    """Peak resident set size while the block runs (sampled by a background thread)."""

    def __init__(self, interval: float = 0.002):
        self.proc, self.interval = psutil.Process(), interval

    def __enter__(self):
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def measure(fn, device: str, repeat: int) -> dict:
    fn()  # warm-up
    times, peaks, rises = [], [], []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            peaks.append(torch.cuda.max_memory_allocated())
            rises.append(peaks[-1] - base)
        else:
            with PeakRSS() as mem:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            peaks.append(mem.peak)
            rises.append(mem.peak - mem.base)
    return {"seconds": statistics.median(times), "peak_bytes": max(peaks), "rise_bytes": max(rises)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    model, tok = kvtool.load_model(args.model, device=args.device)
    sample = passkey_samples(tok, 1, args.seq_len, seed=0)[0]
    ids = sample.input_ids.view(1, -1).to(args.device)
    decoder = model.get_decoder()

    @torch.inference_mode()
    def plain():
        decoder(input_ids=ids, use_cache=False)

    tracer = Tracer(model, TraceConfig())

    def profiling():
        tracer.trace_sample(sample)

    res = {"plain_sdpa": measure(plain, args.device, args.repeat)}
    with _tracing(tracer):
        res["profiling"] = measure(profiling, args.device, args.repeat)
    p, q = res["plain_sdpa"], res["profiling"]
    res["ratios"] = {"time": q["seconds"] / p["seconds"], "peak_memory": q["peak_bytes"] / p["peak_bytes"],
                     "activation_memory": q["rise_bytes"] / max(p["rise_bytes"], 1)}
    res["setup"] = {"seq_len": args.seq_len, "repeat": args.repeat, "device": args.device,
                    "torch_threads": torch.get_num_threads(), "model": getattr(model, "kvtool_name", args.model)}
    if args.json:
        print(json.dumps(res, indent=2))
        return
    mib = 2 ** 20
    print(f"{args.seq_len} tokens, {args.device}, median of {args.repeat}")
    for name in ("plain_sdpa", "profiling"):
        r = res[name]
        print(f"  {name:11s} {r['seconds']:7.2f} s   peak {r['peak_bytes'] / mib:8.0f} MiB   "
              f"rise {r['rise_bytes'] / mib:7.0f} MiB")
    rt = res["ratios"]
    print(f"  ratios: time {rt['time']:.3f}x (target <= 1.3), peak memory {rt['peak_memory']:.3f}x (target <= 1.2), "
          f"activation memory {rt['activation_memory']:.3f}x")


if __name__ == "__main__":
    main()
