"""Decode-attention kernels on a GPU: bandwidth, time against torch sdpa, end-to-end decode tokens/s.

    python benchmarks/decode_kernel.py                          # all three parts, markdown tables
    python benchmarks/decode_kernel.py --parts kernel --lengths 32768 --batches 1 --json

(i)  bandwidth: the bytes decode_attention must read (packed K/V codes, value scales, 16-bit sink and buffer) over
     its GPU time, against a device-to-device copy (torch `copy_` of a large buffer, counted as read + write).
(ii) time of one decode step of attention on the Llama-3-8B shape (32 query heads, 8 KV heads, head_dim 128) at
     8k/32k/128k tokens, batch 1 and 8, 4- and 2-bit K and V, against torch sdpa (enable_gqa) on the same tokens in a
     16-bit cache. GPU time = CUDA-graph replay of 20 calls (launch overhead excluded; both sides alike), with CUDA
     events, after a warm-up; the median of --iters replays. "eager" adds the Python launch cost of one call.
(iii) end-to-end greedy decode tokens/s with random weights: SmolLM2-135M config and a Llama-3-8B-shaped config
     (--e2e-layers to shorten it), kvtool.CompressedCache(model, profile, policy=..., backend=...) with the cupy and
     the torch backend against transformers' own cache. Needs the quantized runtime's `backend=` argument; where
     CompressedCache lacks it the part is skipped with a note. The profile is synthetic: a real trace of one
     random-token sample (ranges of the random model), heads picked by the policy (default random:0.5).

Needs a CUDA GPU and CuPy (`pip install kvtool[gpu]`); elsewhere it stops with a one-line message. Never a test.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import statistics
import sys
import time

import torch

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0)
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                    tie_word_embeddings=True)


def fail(msg: str) -> None:
    print(f"Error: {msg}", file=sys.stderr)
    raise SystemExit(1)


# ------------------------------------------------------------------------------------------------------------ timing
def gpu_time_ms(fn, iters: int, warmup: int, per_graph: int = 20) -> tuple[float, str]:
    """Median GPU milliseconds of one fn() call: CUDA-graph replays of `per_graph` calls, timed with CUDA events
    (launch overhead excluded). Falls back to eager back-to-back calls if capture fails. Returns (ms, how)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                       # warm-up off the default stream, as torch advises for graphs
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(per_graph):
                fn()
        run, calls, how = graph.replay, per_graph, "graph"
    except Exception:                                   # noqa: BLE001 - capture is an optimisation of the timer
        torch.cuda.synchronize()

        def run():
            for _ in range(per_graph):
                fn()
        calls, how = per_graph, "eager"
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times), how


def eager_time_ms(fn, iters: int, warmup: int) -> float:
    """Median wall milliseconds of one synchronised call (GPU time + Python/launch overhead)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def copy_bandwidth(mib: int, iters: int) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written per second)."""
    src = torch.empty(mib << 20, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms, _ = gpu_time_ms(lambda: dst.copy_(src), iters, warmup=3, per_graph=5)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


# ------------------------------------------------------------------------------------------------------------ part i/ii
def build_store(batch, kv_heads, head_dim, tokens, sink, buffer, bits, group, dtype):
    """A 16-bit cache of `tokens` tokens and the same tokens as sink | quantized body | buffer (cupy quantizers)."""
    import cupy_kernels as ck

    k16 = torch.randn(batch, kv_heads, tokens, head_dim, device="cuda", dtype=dtype)
    v16 = torch.randn_like(k16)
    sink, buffer = min(sink, tokens), min(buffer, max(0, tokens - sink))
    body = slice(sink, tokens - buffer)
    kb = k16[:, :, body]
    lo = kb.amin((0, 2)).float()                        # [H, D] per-channel range of these keys
    span = (kb.amax((0, 2)).float() - lo).clamp_min(1e-6)
    k_codes = ck.quantize_keys(kb, lo, span, None, bits, backend="cupy")
    v_codes, v_lo, v_span = ck.quantize_values(v16[:, :, body], None, bits, group, backend="cupy")
    store = dict(k_sink=k16[:, :, :sink].contiguous(), v_sink=v16[:, :, :sink].contiguous(), k_codes=k_codes,
                 k_lo=lo, k_span=span, k_levels=None, k_bits=bits, v_codes=v_codes, v_lo=v_lo, v_span=v_span,
                 v_levels=None, v_bits=bits, k_buf=k16[:, :, tokens - buffer:].contiguous(),
                 v_buf=v16[:, :, tokens - buffer:].contiguous())
    return k16, v16, store


def store_bytes(store) -> int:
    """What decode_attention must read: packed codes, value scales, 16-bit sink and buffer."""
    return sum(store[k].numel() * store[k].element_size()
               for k in ("k_sink", "v_sink", "k_codes", "v_codes", "v_lo", "v_span", "k_buf", "v_buf"))


def kernel_rows(args, copy_gbs: float) -> list[dict]:
    import cupy_kernels as ck

    rows = []
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    g = args.heads // args.kv_heads
    scale = 1.0 / math.sqrt(args.head_dim)
    for batch in args.batches:
        for tokens in args.lengths:
            k16 = v16 = None
            for bits in args.bits:
                torch.cuda.empty_cache()
                k16, v16, store = build_store(batch, args.kv_heads, args.head_dim, tokens, args.sink, args.buffer,
                                              bits, args.group, dtype)
                q = torch.randn(batch, args.heads, args.head_dim, device="cuda", dtype=dtype)

                def ours():
                    return ck.decode_attention(q, **store, scale=scale, backend="cupy")

                def sdpa():
                    return torch.nn.functional.scaled_dot_product_attention(
                        q.unsqueeze(2), k16, v16, scale=scale, enable_gqa=g > 1)

                err = float((ours().float() - sdpa().squeeze(2).float()).abs().max())   # sanity, not a bound
                t_ours, how = gpu_time_ms(ours, args.iters, args.warmup)
                t_sdpa, how_sdpa = gpu_time_ms(sdpa, args.iters, args.warmup)
                e_ours = eager_time_ms(ours, max(5, args.iters // 5), 3)
                nbytes = store_bytes(store)
                gbs = nbytes / (t_ours * 1e-3) / 1e9
                sdpa_bytes = 2 * k16.numel() * k16.element_size()
                rows.append(dict(batch=batch, tokens=tokens, bits=bits, kvtool_us=t_ours * 1e3,
                                 kvtool_eager_us=e_ours * 1e3, sdpa_us=t_sdpa * 1e3, speedup=t_sdpa / t_ours,
                                 bytes_read_mb=nbytes / 1e6, sdpa_bytes_mb=sdpa_bytes / 1e6, gbs=gbs,
                                 copy_fraction=gbs / copy_gbs, sdpa_gbs=sdpa_bytes / (t_sdpa * 1e-3) / 1e9,
                                 max_abs_diff_vs_sdpa=err, timer=f"{how}/{how_sdpa}"))
                del store, q
            del k16, v16
    return rows


# ------------------------------------------------------------------------------------------------------------ part iii
def random_model(kind: str, layers: int | None, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(LLAMA3_8B if kind == "llama3-8b" else SMOLLM2_135M)
    if layers:
        cfg["num_hidden_layers"] = layers
    config = LlamaConfig(**cfg)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def synthetic_profile(model, seq_len: int = 512):
    """A real trace of one random-token sample: channel ranges (and head statistics) of this random model."""
    import kvtool
    from kvtool.data import Sample
    from kvtool.trace import TraceConfig

    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (seq_len,), generator=torch.Generator().manual_seed(0))
    sample = Sample(ids, torch.zeros((0, 2), dtype=torch.int64), [], [], {"kind": "random"})
    return kvtool.profile_model(model, [sample], config=TraceConfig(query_samples=16), name="synthetic")


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


@torch.inference_mode()
def decode_rate(model, make_cache, context: int, steps: int, batch: int) -> tuple[float, int]:
    """Greedy decode tokens/s (batch * steps / seconds) after a chunked prefill of `context` random tokens; also
    the bytes the cache holds at the end (-1 when it cannot say)."""
    from kvtool.cache import with_cache                 # `cache=` or `past_key_values=`, as transformers names it

    ids = torch.randint(0, model.config.vocab_size, (batch, context), device="cuda")
    cache = make_cache()
    out = None
    for start in range(0, context, 512):
        out = model(input_ids=ids[:, start:start + 512], use_cache=True, logits_to_keep=1, **with_cache(model, cache))
        cache = _cache_of(out)
    nxt = out.logits[:, -1:].argmax(-1)
    for _ in range(3):                                  # warm-up (compiles kernels on first use)
        out = model(input_ids=nxt, use_cache=True, **with_cache(model, cache))
        nxt = out.logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=nxt, use_cache=True, **with_cache(model, cache))
        nxt = out.logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    rate = batch * steps / (time.perf_counter() - t)
    held = cache.nbytes() if hasattr(cache, "nbytes") else -1
    return rate, held


def e2e_rows(args) -> tuple[list[dict], list[str]]:
    """Part (iii). Imports kvtool.cache lazily: the quantized runtime (CompressedCache(..., backend=...)) is
    developed separately; without the `backend` argument this part is skipped with a note."""
    notes = []
    try:
        from kvtool.cache import CompressedCache
    except Exception as exc:                            # noqa: BLE001
        return [], [f"end-to-end skipped: kvtool.cache does not import ({exc})"]
    if "backend" not in inspect.signature(CompressedCache.__init__).parameters:
        return [], ["end-to-end skipped: CompressedCache has no backend= argument yet (the quantized runtime adds it)"]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    rows = []
    for kind in args.e2e_models:
        model = random_model(kind, args.e2e_layers if kind == "llama3-8b" else None, dtype)
        context = min(args.e2e_context, model.config.max_position_embeddings - args.e2e_steps - 8)
        try:
            profile = synthetic_profile(model)
        except Exception as exc:                        # noqa: BLE001
            notes.append(f"{kind}: synthetic profile failed ({type(exc).__name__}: {exc}); skipped")
            continue
        runs = [("transformers cache (16-bit)", lambda: None)]
        for backend in ("cupy", "torch"):
            runs.append((f"kvtool {backend}", lambda b=backend: CompressedCache(model, profile, policy=args.policy,
                                                                               backend=b)))
        for name, make in runs:
            try:
                rate, held = decode_rate(model, make, context, args.e2e_steps, args.e2e_batch)
            except Exception as exc:                    # noqa: BLE001 - report and go on with the other runs
                notes.append(f"{kind} / {name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                continue
            rows.append(dict(model=kind, layers=model.config.num_hidden_layers, cache=name, context=context,
                             batch=args.e2e_batch, tokens_per_s=rate, cache_mb=held / 1e6 if held >= 0 else None))
            torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()
    return rows, notes


# ------------------------------------------------------------------------------------------------------------ output
def print_tables(device: str, copy_gbs: float | None, kernel: list[dict], e2e: list[dict], notes: list[str],
                 args) -> None:
    print(f"device: {device}")
    if copy_gbs is not None:
        print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write, {args.copy_mib} MiB buffer)\n")
    if kernel:
        print(f"decode attention, {args.heads} q heads / {args.kv_heads} KV heads, D={args.head_dim}, "
              f"sink {args.sink} + quantized body + buffer {args.buffer} ({args.dtype}), value group {args.group}\n")
        print("| batch | tokens | K/V bits | kvtool µs | kvtool eager µs | sdpa 16-bit µs | speedup | MB read "
              "| GB/s | % of copy | sdpa GB/s |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in kernel:
            print(f"| {r['batch']} | {r['tokens']} | {r['bits']} | {r['kvtool_us']:.1f} | {r['kvtool_eager_us']:.0f} "
                  f"| {r['sdpa_us']:.1f} | {r['speedup']:.2f}x | {r['bytes_read_mb']:.1f} | {r['gbs']:.0f} "
                  f"| {100 * r['copy_fraction']:.0f}% | {r['sdpa_gbs']:.0f} |")
        print()
    if e2e:
        print(f"end-to-end greedy decode, random weights, policy {args.policy!r}\n")
        print("| model | layers | cache | context | batch | tokens/s | cache MB |")
        print("|---|---:|---|---:|---:|---:|---:|")
        for r in e2e:
            mb = "" if r["cache_mb"] is None else f"{r['cache_mb']:.0f}"
            print(f"| {r['model']} | {r['layers']} | {r['cache']} | {r['context']} | {r['batch']} "
                  f"| {r['tokens_per_s']:.1f} | {mb} |")
        print()
    for n in notes:
        print(f"note: {n}")


def parse_args(argv=None):
    ints = lambda s: [int(x) for x in s.split(",") if x]            # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="bandwidth,kernel,e2e",
                   help="comma list of bandwidth (copy reference), kernel (parts i+ii), e2e (part iii)")
    p.add_argument("--lengths", type=ints, default=[8192, 32768, 131072], help="tokens in the cache")
    p.add_argument("--batches", type=ints, default=[1, 8])
    p.add_argument("--bits", type=ints, default=[4, 2], help="K and V bits")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--group", type=int, default=32, help="value group (channels per scale)")
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--buffer", type=int, default=128)
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--copy-mib", type=int, default=2048)
    p.add_argument("--e2e-models", default="smollm2,llama3-8b")
    p.add_argument("--e2e-layers", type=int, default=None, help="layers of the Llama-3-8B-shaped model (default 32)")
    p.add_argument("--e2e-context", type=int, default=4096)
    p.add_argument("--e2e-steps", type=int, default=64)
    p.add_argument("--e2e-batch", type=int, default=1)
    p.add_argument("--policy", default="heads=random:0.5,k=4,v=4")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = p.parse_args(argv)
    args.parts = set(args.parts.split(","))
    args.e2e_models = [m for m in args.e2e_models.split(",") if m]
    unknown = args.parts - {"bandwidth", "kernel", "e2e"} or set(args.e2e_models) - {"smollm2", "llama3-8b"}
    if unknown:
        fail(f"unknown choice(s): {', '.join(sorted(unknown))}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import cupy_kernels

    if not torch.cuda.is_available() or not cupy_kernels.available():
        fail("this benchmark needs a CUDA GPU and CuPy (pip install kvtool[gpu]); none is usable here")
    device = torch.cuda.get_device_name()
    copy_gbs = copy_bandwidth(args.copy_mib, args.iters) if args.parts & {"bandwidth", "kernel"} else None
    kernel = kernel_rows(args, copy_gbs) if "kernel" in args.parts else []
    e2e, notes = e2e_rows(args) if "e2e" in args.parts else ([], [])
    if args.json:
        print(json.dumps({"device": device, "copy_gbs": copy_gbs, "kernel": kernel, "e2e": e2e, "notes": notes,
                          "args": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()}},
                         indent=1))
    else:
        print_tables(device, copy_gbs, kernel, e2e, notes, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
