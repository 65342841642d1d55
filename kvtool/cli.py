"""`kvtool` command line: a thin typer layer over kvtool's Python API.

Errors a user can cause come out as one line, `Error: ...`, with exit code 1 and no traceback.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from kvtool import sections
from kvtool.errors import KvtoolError
from kvtool.textsafe import shown
from kvtool.cli_base import (_Command, _default_output, _progress, _quiet_libraries, _table, _writable_target,  # noqa: F401
                             app, err, out)


class Terminated(BaseException):
    """Raised by the SIGTERM handler: unwinds like Ctrl-C, so every `finally` removes its temporary files."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def main() -> None:
    """Console-script entry point.

    Exit codes: 0 done, 1 bad input (`Error: ...`), 2 usage error, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
    With standalone_mode=False typer turns KeyboardInterrupt into `Exit(130)` and *returns* its code (as it does for
    any `typer.Exit`), so the returned value is the exit code."""
    import signal

    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:               # not the main thread (main() called from a worker): keep the default
        previous = None
    try:
        code = _run_app()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if code == 130:
        err.print("[bold red]Error:[/] interrupted")
    if isinstance(code, int) and not isinstance(code, bool) and code != 0:
        sys.exit(code)


def _run_app():
    """Run the app; return its exit code (0/None when done) or exit with a one-line error."""
    try:
        return app(standalone_mode=False)
    except KvtoolError as exc:
        err.print(f"[bold red]Error:[/] {shown(exc)}", soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        return 130
    except Terminated:
        err.print("[bold red]Error:[/] terminated (SIGTERM)")
        sys.exit(143)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # usage errors: typer vendors its own click, so match by shape, not by class
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            if exc.format_message().strip():   # empty after `kvtool` alone, which has printed the help
                err.print(f"[bold red]Error:[/] {shown(exc.format_message(), newlines=True)}", soft_wrap=True)
            sys.exit(exc.exit_code or 2)
        if type(exc).__name__ == "Abort":
            sys.exit(1)
        raise



@app.command(cls=_Command)
def profile(
    model: Optional[str] = typer.Argument(None, help="HF model id (already cached), local directory or .gguf; default: the embedded SmolLM2-135M-Instruct."),
    data: Optional[str] = typer.Option(None, "--data", help="'passkey' (built-in synthetic needles) or a .txt / .jsonl file."),
    samples: int = typer.Option(8, "--samples", "-n", help="Number of calibration samples."),
    seq_len: int = typer.Option(1024, "--seq-len", "-L", help="Tokens per sample."),
    needles: int = typer.Option(3, "--needles", help="Passkeys per built-in sample."),
    sink: int = typer.Option(64, "--sink", help="Sink tokens for the streaming statistics."),
    recent: int = typer.Option(256, "--recent", help="Recent window for the streaming statistics."),
    query_samples: int = typer.Option(128, "--query-samples", help="Queries per sample whose attention rows are traced (0 = all)."),
    seed: int = typer.Option(42, "--seed", help="Random seed of the built-in passkey samples (needles, keys, haystack windows)."),
    dtype: str = typer.Option("float32", "--dtype", help="Model dtype: float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda (under torchrun: each rank's own GPU)."),
    device_map: Optional[str] = typer.Option(None, "--device-map", help="Split the model over devices with accelerate: auto, balanced, sequential or a .json {module: device} (instead of --device)."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="With --device-map: memory per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB."),
    no_stats: bool = typer.Option(False, "--no-stats", help="Leave out raw statistics (smaller file; cannot be merged)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Profile to write (default: smollm2.kv.st for the embedded model, else <model>.kv.st)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Trace MODEL on calibration data in one pass and write a .kv.st profile.

    Under `torchrun --nproc-per-node N -m kvtool profile ...` the N processes trace disjoint shares of the samples
    and all-reduce their statistics (gloo on cpu, nccl on cuda); rank 0 writes the profile."""
    from kvtool import checks, distributed
    from kvtool.api import check_lengths
    from kvtool.data import check_data
    from kvtool.models import _as_dtype
    from kvtool.trace import TraceConfig

    path = _writable_target(output or _default_output(model))
    config = TraceConfig(sink=sink, recent=recent, query_samples=query_samples)
    checks.samples(samples)
    checks.whole("--needles", needles)
    checks.seed(seed)
    _as_dtype(dtype)
    checks.device(device)
    placement = checks.device_map(device_map, device, max_memory)
    check_lengths(None, seq_len, config, limit=checks.model_context(model))       # all before the model loads
    check_data(data, seq_len)
    _quiet_libraries()
    distributed.init(device, placement[0])
    try:
        _profile(model, data, samples, seq_len, needles, seed, dtype, distributed.local_device(device), config,
                 no_stats, path, as_json, distributed.rank_placement(placement))
    finally:
        distributed.finish()


def _profile(model, data, samples, seq_len, needles, seed, dtype, device, config, no_stats, path, as_json,
             placement) -> None:
    """`kvtool profile` after its options are checked: load, trace (this rank's shard), write on rank 0."""
    import contextlib

    from kvtool import distributed
    from kvtool.api import check_lengths, profile_model
    from kvtool.data import describe, load_samples
    from kvtool.models import load_model

    main = distributed.is_main()                                 # rank 0 (or the only process) talks and writes
    status = err.status if main else (lambda *a, **k: contextlib.nullcontext())
    t0 = time.perf_counter()
    with status("Loading model (the first load of the embedded GGUF converts it, ~20 s)"):
        mdl, tok = load_model(model, dtype=dtype, device=device, device_map=placement[0], max_memory=placement[1])
    load_s = time.perf_counter() - t0
    check_lengths(mdl, seq_len, config)
    with status("Preparing calibration data"):
        batch = load_samples(data, tok, samples, seq_len, seed=seed, n_needles=needles)
    if len(batch) < samples and main:
        err.print(f"[yellow]Note:[/] the data gives only {len(batch)} samples of {seq_len} tokens (asked for {samples})")
    world = distributed.world_size()
    mine = len(distributed.shard(batch))
    with (_progress() if main else contextlib.nullcontext()) as bar:
        task = bar.add_task("Tracing", total=mine, info=f"{seq_len} tok/sample"
                            + (f", rank 0 of {world}" if world > 1 else "")) if main else None
        prof = profile_model(mdl, batch, config=config, data=describe(data), seed=seed, keep_stats=not no_stats,
                             on_sample=(lambda i: bar.update(task, completed=i)) if main else None)
    if not main:
        return
    err.print(f"Traced {len(batch)} samples of {seq_len} tokens in {prof.calibration['trace_seconds']:.1f} s"
              + (f" on {world} processes" if world > 1 else ""))
    prof.save(path)
    summary = {"output": str(path), "bytes": path.stat().st_size, "model": prof.model.get("name"),
               "fingerprint": prof.model["fingerprint"], "samples": len(batch), "seq_len": seq_len,
               "load_seconds": round(load_s, 2), "trace_seconds": prof.calibration["trace_seconds"],
               "world_size": world, **_head_counts(prof)}
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    table = Table(title="kvtool profile", show_header=False)
    table.add_column()
    table.add_column(overflow="fold")                          # a fingerprint or a long path: folded, never cut
    for k, v in summary.items():
        table.add_row(k, Text(str(v)))
    out.print(table)
    out.print(f"Next: [bold]kvtool inspect {shown(path)}[/] (add --plot heads.png for heatmaps)")



def _head_counts(prof) -> dict:
    ret, stream = prof[sections.COPY_SCORE], prof[sections.STREAMING_MASS]
    return {"kv_heads": ret.numel(), "heads_copy_score_over_0.1": int((ret > 0.1).sum()),
            "mean_streaming_mass": round(stream.mean().item(), 4)}


@app.command(cls=_Command)
def inspect(
    profile_path: Path = typer.Argument(..., metavar="PROFILE", help="A .kv.st profile."),
    top: int = typer.Option(10, "--top", help="Rows per table."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw heatmaps to this PNG."),
    as_json: bool = typer.Option(False, "--json", help="Print the tables as JSON."),
) -> None:
    """Summarise a profile: retrieval/streaming heads, layer similarity, outlier channels, PCA."""
    from kvtool.inspect import plot as draw
    from kvtool.inspect import summarize
    from kvtool.profile import Profile

    prof = Profile.load(profile_path)
    summary = summarize(prof, top=top)
    if plot is not None:
        summary["plot"] = str(draw(prof, plot))
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    m, c = summary["model"], summary["calibration"]
    out.print(f"[bold]{shown(profile_path)}[/]: {shown(m.get('name') or m.get('architecture'))} — "
              f"{m['num_layers']} layers, {shown(m.get('num_attention_heads'))} query / {m['num_kv_heads']} KV heads, "
              f"head_dim {m['head_dim']}; {shown(c.get('samples'))} samples, data {shown((c.get('data') or {}).get('kind'))}")
    for name, m in summary.get("methods", {}).items():
        heads = ", ".join(f"{l}.{h}" for l, h in m["heads (layer, kv_head) by score"])
        out.print(f"[bold]{shown(name)}[/]: {m['retrieval_heads']} of {m['kv_heads']} KV heads are retrieval heads "
                  f"(layer.head, best first): {heads or '-'}")
    for key, title in (("retrieval_heads", "Most retrieval-like KV heads"),
                       ("streaming_heads", "Most streaming-like KV heads"),
                       ("layer_similarity", "Adjacent-layer attention similarity (1 - JS/ln2, mean over KV heads)"),
                       ("outlier_channels", "Outlier channels (abs-max ≥ 4× the head's median channel)"),
                       ("pca", "PCA: explained variance at rank r (mean over layers and KV heads)"),
                       ("lowrank", "Low-rank (calibrate --method pca): ranks that keep energy E, per layer and KV head"),
                       ("pod", "PoD layer groups (calibrate --method pod): shared keys, key-map and sharing errors")):
        rows = summary.get(key)
        if rows:
            out.print(_table(title, rows))
        elif key == "outlier_channels" or (key == "pod" and key in summary):
            out.print(f"{title}: none")
    if plot is not None:
        out.print(f"Heatmaps written to [bold]{shown(plot)}[/]")


@app.command(cls=_Command)
def merge(
    profiles: list[Path] = typer.Argument(..., help="Profiles of disjoint data shards (same model and settings)."),
    output: Path = typer.Option(..., "--output", "-o", help="Merged profile to write."),
) -> None:
    """Merge profiles traced on shards of the data into the profile of all of it."""
    from kvtool.api import merge_profiles
    from kvtool.profile import Profile

    path = _writable_target(output)
    seen: dict[Path, Path] = {}
    for p in profiles:
        key = p.resolve()
        if key in seen:
            raise KvtoolError(f"{p} is given twice (as {seen[key]} and {p}); each shard counts once")
        seen[key] = p
    merged = merge_profiles(*(Profile.load(p) for p in profiles), names=[str(p) for p in profiles])
    merged.save(path)
    out.print(f"Merged {len(profiles)} profiles ({merged.calibration['samples']} samples, seeds "
              f"{', '.join(map(str, merged.calibration['seeds']))}) "
              f"into [bold]{shown(path)}[/]")


@app.command("export", cls=_Command)
def export_cmd(
    profile_path: Path = typer.Argument(..., metavar="PROFILE", help="A .kv.st profile."),
    fmt: str = typer.Option(..., "--format", "-f", help="vllm: FP8 k_scale/v_scale + kv_cache_scheme (compressed-tensors); duo: DuoAttention's full_attention_heads.tsv + config.json (also read by kvpress)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Directory to write (made if absent; default: <profile name>.<format>)."),
    per_head: bool = typer.Option(False, "--per-head", help="vllm: one scale per KV head (strategy attn_head) instead of one per layer."),
    prefix: str = typer.Option("model.layers.{layer}.self_attn", "--prefix", help="vllm: module name of layer {layer}'s attention; the scales are <prefix>.k_scale / .v_scale."),
    heads: Optional[str] = typer.Option(None, "--heads", help="duo: head method whose scores to write (default: duo if calibrated, else the profile's policy's)."),
    binary: bool = typer.Option(False, "--binary", help="duo: write the method's 0/1 retrieval mask instead of its continuous score."),
    sink: Optional[int] = typer.Option(None, "--sink", help="duo: sink_size (default: the method's deployment window)."),
    recent: Optional[int] = typer.Option(None, "--recent", help="duo: recent_size (default: the method's deployment window)."),
    as_json: bool = typer.Option(False, "--json", help="Print the written paths as JSON."),
) -> None:
    """Write a profile's calibration for another engine: vLLM's FP8 KV scales, or DuoAttention/kvpress head patterns."""
    from kvtool.export import check_format, export
    from kvtool.profile import Profile

    check_format(fmt)
    if output is None:
        output = Path(profile_path.name.removesuffix(".st").removesuffix(".kv") + f".{fmt}")
    prof = Profile.load(profile_path)
    paths = export(prof, fmt, output, per_head=per_head, prefix=prefix, method=heads, binary=binary, sink=sink,
                   recent=recent)
    if as_json:
        print(json.dumps({"format": fmt, "output": str(output), "files": [str(p) for p in paths]}, indent=2))
        return
    out.print(f"Wrote {', '.join(shown(p.name) for p in paths)} into [bold]{shown(output)}[/] ({fmt})", soft_wrap=True)


@app.command("policy", cls=_Command)
def policy_cmd(
    profile_path: Path = typer.Argument(..., metavar="PROFILE", help="A .kv.st profile."),
    policy: Optional[str] = typer.Argument(None, help="A policy to make the profile's default (leave out to print the current one)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="The profile's model, to check the policy on (default: the embedded SmolLM2-135M-Instruct)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the profile with the new default here instead of replacing PROFILE."),
    as_json: bool = typer.Option(False, "--json", help="Print the policy as JSON."),
) -> None:
    """Print a profile's default policy, or set it: `kvtool run` and `CompressedCache(model, profile)` use it when no
    policy is given. A new policy is checked by building its cache on the model first; the file is replaced
    atomically."""
    from kvtool import checks
    from kvtool.policy import Policy
    from kvtool.profile import Profile

    checks.profile_file(profile_path)
    if policy is None:
        prof = Profile.load(profile_path)
        text = str(Policy.from_profile(prof.policy))
        if as_json:
            print(json.dumps({"profile": str(profile_path), "policy": text, "stored": prof.policy}, indent=2))
        else:
            out.print(shown(text), soft_wrap=True)
        return
    if not policy.strip():
        raise KvtoolError("the policy is empty; give one such as heads=duo:0.5,k=4,v=4 (or leave it out to print "
                          "the current one)")
    Policy.parse(policy, default_method="duo")                     # malformed: refused before the model loads
    target = _writable_target(output if output is not None else profile_path)
    from kvtool.api import set_policy
    from kvtool.models import load_model

    _quiet_libraries()
    with err.status("Loading model"):
        mdl, _ = load_model(model)
        prof = Profile.load(profile_path, model=mdl)
    new = set_policy(mdl, prof, policy)
    new.save(target)
    text = new.policy["policy"]
    if as_json:
        print(json.dumps({"profile": str(target), "policy": text}, indent=2))
    else:
        out.print(f"Default policy of [bold]{shown(target)}[/]: {shown(text)}", soft_wrap=True)


@app.command("cache")
def cache_cmd(
    clear: bool = typer.Option(False, "--clear", help="Remove every cached conversion (the next load converts again, ~20 s)."),
    as_json: bool = typer.Option(False, "--json", help="Print the listing as JSON."),
) -> None:
    """List (or clear) kvtool's model conversion cache: one float32 copy of each GGUF model kvtool has loaded."""
    from kvtool.models import cache_dir, cache_entries, clear_cache

    root = cache_dir()
    if clear:
        n, removed = clear_cache()
        if as_json:
            print(json.dumps({"cache_dir": str(root), "removed_entries": n, "removed_bytes": removed}, indent=2))
        else:
            out.print(f"Removed {n} cache entries ({removed / 1e6:.1f} MB) from {shown(root)}")
        return
    rows = cache_entries()
    total = sum(r["bytes"] for r in rows)
    if as_json:
        print(json.dumps({"cache_dir": str(root), "entries": rows, "total_bytes": total}, indent=2))
        return
    if not rows:
        out.print(f"The model cache {shown(root)} is empty")
        return
    table = Table(title=f"kvtool model cache: {shown(root / 'models')}", title_justify="left")
    for col, justify in (("entry", "left"), ("kind", "left"), ("MB", "right")):
        table.add_column(col, justify=justify)
    for r in rows:
        table.add_row(shown(Path(r["path"]).name), shown(r["kind"]), f"{r['bytes'] / 1e6:.1f}")
    table.add_row("total", "", f"{total / 1e6:.1f}")
    out.print(table)
    out.print("Clear it with [bold]kvtool cache --clear[/] (the next load of a GGUF converts it again).")


from kvtool import cli_calibrate, cli_run  # noqa: E402,F401  (register `calibrate`, `run` and `bench` on the app)

if __name__ == "__main__":
    main()
