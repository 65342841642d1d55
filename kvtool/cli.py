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
from kvtool.cli_base import (_Command, _progress, _quiet_libraries, _table, _writable_target, app,  # noqa: F401
                             err, out)


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


def _default_output(model: Optional[str], method: Optional[str] = None) -> Path:
    """`smollm2.kv.st` for the embedded model (not the shipped profile's name, so the two are never confused),
    else `<model directory or file stem>.kv.st`; a calibration without --profile adds `.<method>`."""
    stem = "smollm2" if model is None else Path(model.rstrip("/")).name.lower().removesuffix(".gguf")
    return Path(f"{stem}.{method}.kv.st" if method else f"{stem}.kv.st")


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


def _lengths(lengths) -> str:
    distinct = sorted(set(lengths or []))
    return "/".join(map(str, distinct)) if distinct else "?"


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


class _CalibrateCommand(_Command):
    """`kvtool calibrate --help`: each method flag's help lists the methods that take it, their meaning and
    defaults, from the methods' contracts (calibrate.contract), and the command's help lists the methods."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        if not getattr(self, "_from_contracts", False):
            from calibrate import contract

            methods = contract.methods()
            reads = [n for n, cls in methods if contract.contract_of(cls).needs_profile]
            own = {"--method": f"Calibration method: {', '.join(n for n, _ in methods)} (see above).",
                   "--profile": f"Refine this profile (made for the same model; {', '.join(reads)} read what it "
                                "traced)."}
            for p in params:
                flag = next((o for o in getattr(p, "opts", []) if o.startswith("--")), None)
                text = own.get(flag) or (contract.flag_help(flag) if flag else "")
                if text:
                    p.help = text
            self.help = (self.help or "") + "\n\n" + "\n\n".join(
                f"{name}: {contract.contract_of(cls).about}." for name, cls in methods)
            self._from_contracts = True
        return params


_METHOD = "(help: `kvtool calibrate --help` lists which methods take it)"


@app.command(cls=_CalibrateCommand)
def calibrate(
    method: str = typer.Option(..., "--method", "-m", help="Calibration method (`kvtool calibrate --help` lists them)."),
    model: Optional[str] = typer.Argument(None, help="Model (default: the embedded SmolLM2-135M-Instruct)."),
    profile_in: Optional[Path] = typer.Option(None, "--profile", help="Refine this profile (made for the same model; some methods need one)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Profile to write (default: --profile, else smollm2.<method>.kv.st for the embedded model, <model>.<method>.kv.st for another)."),
    fraction: Optional[float] = typer.Option(None, "--retrieval-fraction", help=f"Head methods: keep this fraction of KV heads {_METHOD}."),
    samples: Optional[int] = typer.Option(None, "--samples", "-n", help=f"Calibration samples {_METHOD}."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", "-L", help=f"Tokens per sample {_METHOD}."),
    data: Optional[str] = typer.Option(None, "--data", help=f"'passkey' (built-in) or a .txt / .jsonl file {_METHOD}."),
    seed: Optional[int] = typer.Option(None, "--seed", help=f"Random seed {_METHOD}."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help=f"Threshold of the method's score {_METHOD}."),
    bits: Optional[str] = typer.Option(None, "--bits", help=f"Bit widths {_METHOD}."),
    kclip: Optional[float] = typer.Option(None, "--kclip", help=f"Key range quantile level {_METHOD}."),
    vgroup: Optional[int] = typer.Option(None, "--vgroup", help=f"Value channels per scale group {_METHOD}."),
    weighting: Optional[str] = typer.Option(None, "--weighting", help=f"k-means weighting {_METHOD}."),
    probe_len: Optional[int] = typer.Option(None, "--probe-len", help=f"Random tokens per copy {_METHOD}."),
    preset: Optional[str] = typer.Option(None, "--preset", help=f"Settings preset {_METHOD}."),
    steps: Optional[int] = typer.Option(None, "--steps", help=f"Optimisation steps {_METHOD}."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help=f"Checkpoint file {_METHOD}."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help=f"Steps between checkpoints {_METHOD}."),
    resume: bool = typer.Option(False, "--resume", help=f"Continue from --checkpoint {_METHOD}."),
    clip: Optional[float] = typer.Option(None, "--clip", help=f"Latent range quantile level {_METHOD}."),
    max_group: Optional[int] = typer.Option(None, "--max-group", help=f"Most layers per group {_METHOD}."),
    per: Optional[str] = typer.Option(None, "--per", help=f"Group whole layers or single KV heads {_METHOD}."),
    groups: Optional[str] = typer.Option(None, "--groups", help=f"Explicit layer groups {_METHOD}."),
    ridge: Optional[float] = typer.Option(None, "--ridge", help=f"Ridge of the key maps {_METHOD}."),
    heldout: Optional[int] = typer.Option(None, "--heldout", help=f"Held-out samples {_METHOD}."),
    windows: Optional[str] = typer.Option(None, "--windows", help=f"Candidate observation windows {_METHOD}."),
    kernels: Optional[str] = typer.Option(None, "--kernels", help=f"Candidate pooling kernels {_METHOD}."),
    budget: Optional[float] = typer.Option(None, "--budget", help=f"Tokens kept, a fraction of the prompt {_METHOD}."),
    future: Optional[int] = typer.Option(None, "--future", help=f"Oracle query tokens per sample {_METHOD}."),
    train_sink: Optional[int] = typer.Option(None, "--train-sink", help=f"Training sink tokens {_METHOD}."),
    train_recent: Optional[int] = typer.Option(None, "--train-recent", help=f"Training recent tokens {_METHOD}."),
    student: Optional[str] = typer.Option(None, "--student", help=f"Which positions train gated {_METHOD}."),
    reuse: Optional[int] = typer.Option(None, "--reuse", help=f"Steps per training sample (tail student) {_METHOD}."),
    average: Optional[float] = typer.Option(None, "--average", help=f"Deploy the mean gates of this last fraction of steps {_METHOD}."),
    lr: Optional[float] = typer.Option(None, "--lr", help=f"Peak learning rate {_METHOD}."),
    min_len: Optional[int] = typer.Option(None, "--min-len", help=f"Shortest training sample {_METHOD}."),
    max_len: Optional[int] = typer.Option(None, "--max-len", help=f"Longest training sample {_METHOD}."),
    signals: Optional[str] = typer.Option(None, "--signals", help=f"Signals to combine {_METHOD}."),
    dtype: str = typer.Option("float32", "--dtype", help="Model dtype: float32, bfloat16 or float16."),
    device_map: Optional[str] = typer.Option(None, "--device-map", help="Split the model over devices with accelerate: auto, balanced, sequential or a .json {module: device}."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="With --device-map: memory per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Calibrate one method and write its sections into a profile.

    A method flag that the method does not take is refused; a flag left out means the method's default. Methods:"""
    import contextlib

    from calibrate.contract import contract_of
    from calibrate.contract import methods as contract_methods
    from calibrate.heads import check_fraction
    from kvtool import checks, distributed
    from kvtool.api import calibrate as run_calibration
    from kvtool.data import check_data
    from kvtool.models import _as_dtype, load_model
    from kvtool.profile import Profile

    given = {"--samples": samples, "--seq-len": seq_len, "--data": data, "--seed": seed, "--threshold": threshold,
             "--bits": bits, "--kclip": kclip, "--vgroup": vgroup, "--weighting": weighting, "--probe-len": probe_len,
             "--preset": preset, "--steps": steps, "--checkpoint": checkpoint, "--checkpoint-every": checkpoint_every,
             "--resume": resume or None, "--clip": clip, "--max-group": max_group, "--per": per, "--groups": groups,
             "--ridge": ridge, "--heldout": heldout, "--windows": windows, "--kernels": kernels, "--budget": budget,
             "--future": future, "--train-sink": train_sink, "--train-recent": train_recent,
             "--student": student, "--reuse": reuse, "--average": average, "--lr": lr,
             "--min-len": min_len, "--max-len": max_len, "--signals": signals}
    given = {flag: value for flag, value in given.items() if value is not None}
    options, runner = method_options(method, given, fraction)                 # unknown method, bad values: refused
    contract = contract_of(type(runner))
    if fraction is not None:
        check_fraction(fraction)
    path = _writable_target(output or profile_in or _default_output(model, method))
    _as_dtype(dtype)
    placement = checks.device_map(device_map, "cpu", max_memory)
    if profile_in is not None:
        held = checks.profile_tensors(profile_in)             # a missing or broken file is refused here
        from kvtool.sections import LEGACY

        held |= {new for old, new in LEGACY.items() if old in held}      # a renamed section answers to its new name
        missing = [n for n in contract.required(runner) if n not in held]
        if missing:
            raise KvtoolError(f"profile {profile_in} has no {', '.join(missing[:3])}"
                              f"{' ...' if len(missing) > 3 else ''}: {method} needs a profile's {contract.needs}; "
                              "make it with `kvtool profile`")
    elif contract.requires_profile(runner):
        raise KvtoolError(f"{method} needs a profile's {contract.needs}: give --profile (made by `kvtool profile`)")
    if getattr(runner, "checkpoint", None):
        _writable_target(Path(runner.checkpoint))
    seq = getattr(runner, "seq_len", None)
    if seq is not None and not (getattr(runner, "reuse", False) and profile_in is not None):  # it traces anew
        checks.context(checks.model_context(model), seq, f"--seq-len {seq}")
    if "data" in options and seq is not None:          # a data file cut into --seq-len samples (duo: task names)
        check_data(options["data"], seq)
    if distributed.env_world_size() > 1 and not getattr(runner, "shards", False):
        shardable = [n for n, cls in contract_methods() if getattr(cls, "shards", False)]
        raise KvtoolError(f"calibrate --method {method} runs in one process; under torchrun only "
                          f"{', '.join(shardable)} split their work over the ranks (run it without torchrun)")
    _quiet_libraries()
    distributed.init("cpu", placement[0])
    placement = distributed.rank_placement(placement)
    try:
        main = distributed.is_main()
        status = err.status if main else (lambda *a, **k: contextlib.nullcontext())
        with status("Loading model"):
            mdl, tok = load_model(model, dtype=dtype, device_map=placement[0], max_memory=placement[1])
            base = Profile.load(profile_in, model=mdl) if profile_in is not None else None
        if getattr(runner, "reuses", None) and runner.reuses(base) and main:
            c = base.calibration
            err.print(f"{method}: using the copy scores of {shown(profile_in)}'s passkey trace ({c.get('samples')} "
                      f"samples of {_lengths(c.get('lengths'))} tokens); give --samples / --seq-len to trace new "
                      "passkey samples instead", soft_wrap=True)
        world = distributed.world_size()
        with (_progress() if main else contextlib.nullcontext()) as bar:
            total = contract.total(runner, mdl)
            task = bar.add_task(f"calibrate {method}", total=len(range(0, total, world)) if world > 1 else total,
                                info=f"rank 0 of {world}" if world > 1 else "") if main else None
            prof = run_calibration(mdl, tok, method, profile=base, fraction=fraction, options=options,
                                   on_progress=(lambda i, info="": bar.update(task, completed=i, info=shown(info)))
                                   if main else None)
        if not main:
            return
        prof.save(path)
    finally:
        distributed.finish()
    summary = {"output": str(path), **contract.summary(prof)}
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    out.print(f"{shown(contract.text(summary))} -> [bold]{shown(path)}[/]", soft_wrap=True)


def method_options(method: str, given: dict, fraction: float | None = None) -> tuple[dict, object]:
    """`kvtool calibrate`'s flags {flag: value} (only those given) -> (options for kvtool.api.calibrate, the method
    object they make), from the method's contract; a flag the method does not take is refused in one line, and every
    value is checked (the method's dataclass checks the rest) — all before the model loads."""
    import calibrate as registry
    from calibrate.contract import contract_of
    from kvtool.api import make_runner

    contract = contract_of(registry.get(method))
    takes = contract.flags()
    for flag in given:
        if flag not in takes:
            raise KvtoolError(f"{flag} does not apply to {method}")
    if fraction is not None and not contract.fraction:
        raise KvtoolError(f"--retrieval-fraction does not apply to {method}")
    options = {}
    for flag, value in given.items():
        opt = takes[flag]
        if opt.check is not None:
            opt.check(value)
        options[opt.field] = opt.parse(value) if opt.parse is not None else value
    if contract.prepare is not None:
        options = contract.prepare(options)
    cls = registry.get(method)
    if hasattr(cls, "from_preset") and options.get("preset") is None:
        options["preset"] = cls.default_preset()
        err.print(f"{method}: using the '{options['preset']}' preset (choose with --preset {'|'.join(cls.presets)})")
    runner = make_runner(method, options)
    if contract.check is not None:
        contract.check(runner)
    return options, runner


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


from kvtool import cli_run  # noqa: E402,F401  (registers `run` and `bench` on the app)

if __name__ == "__main__":
    main()
