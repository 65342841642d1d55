"""`kvtool calibrate`: one method's sections into a profile. The command's flags are the union of the methods'
contracts (calibrate.contract); `method_options` checks them against the chosen method before the model loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from kvtool.cli_base import _Command, _default_output, _progress, _quiet_libraries, _writable_target, app, err, out
from kvtool.errors import KvtoolError
from kvtool.textsafe import shown


def _lengths(lengths) -> str:
    distinct = sorted(set(lengths or []))
    return "/".join(map(str, distinct)) if distinct else "?"


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
