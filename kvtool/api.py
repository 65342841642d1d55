"""The Python API behind `kvtool profile`: trace a model on samples and build a Profile; merge profiles of shards."""

from __future__ import annotations

import datetime as _dt
import time

from kvtool import __version__
from kvtool.errors import KvtoolError
from kvtool.profile import Profile, model_meta
from kvtool.trace import Dims, TraceConfig, TraceStats, Tracer, check_lengths, config_dict  # noqa: F401

DEFAULT_POLICY = {"policy": "heads=retrieval:0.5"}      # kvtool.policy: the canonical policy string (kvtool.policy)


def profile_model(model, samples, *, config: TraceConfig | None = None, data: dict | None = None, seed: int = 42,
                  name: str | None = None, keep_stats: bool = True, on_sample=None) -> Profile:
    """Trace `samples` (a list of kvtool.data.Sample) through `model` and return the Profile (not yet saved)."""
    config = config or TraceConfig()
    if not samples:
        raise KvtoolError("zero samples: nothing to profile (raise --samples, or give a longer data file)")
    for s in samples:
        check_lengths(model, s.input_ids.numel(), config)
    start = time.perf_counter()
    stats = Tracer(model, config).run(samples, on_sample=on_sample)
    seconds = time.perf_counter() - start
    calibration = {
        "data": data or {"kind": "unknown"},
        "samples": len(samples),
        "lengths": [int(s.input_ids.numel()) for s in samples],
        "seed": seed,
        "methods": {"trace": config_dict(config)},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "kvtool_version": __version__,
        "trace_seconds": round(seconds, 2),
    }
    return build_profile(stats, model_meta(model, name=name or getattr(model, "kvtool_name", None)), calibration,
                         keep_stats=keep_stats)


def build_profile(stats: TraceStats, model: dict, calibration: dict, keep_stats: bool = True) -> Profile:
    tensors = stats.derive()
    if keep_stats:
        tensors.update(stats.state())
    return Profile(tensors=tensors, model=model, calibration=calibration, policy=dict(DEFAULT_POLICY))


def stats_of(profile: Profile) -> TraceStats:
    """The raw, mergeable statistics stored in a profile's `stats.` section."""
    trace_cfg = profile.calibration.get("methods", {}).get("trace")
    if trace_cfg is None:
        raise KvtoolError("profile has no trace settings in kvtool.calibration; it was not made by `kvtool profile`")
    m = profile.model
    dims = Dims(m["num_layers"], m["num_attention_heads"], m["num_kv_heads"], m["head_dim"])
    return TraceStats.from_state(profile.tensors, TraceConfig.from_dict(trace_cfg), dims)


def merge_profiles(*profiles: Profile) -> Profile:
    """Merge profiles traced on disjoint shards of data (same model, same settings) into one.

    The result equals the profile of all the data traced at once (see TraceStats for the float tolerance). Only
    the trace is merged: calibration sections (`heads.<method>.*`) are not carried over; calibrate the merged profile.
    """
    if len(profiles) < 2:
        raise KvtoolError("give at least two profiles to merge")
    first = profiles[0]
    stats = stats_of(first)
    for p in profiles[1:]:
        if p.model.get("fingerprint") != first.model.get("fingerprint"):
            raise KvtoolError("cannot merge profiles of different models (fingerprints differ)")
        stats.merge(stats_of(p))
    datas = [p.calibration.get("data") for p in profiles]
    calibration = dict(first.calibration)
    calibration.update(samples=stats.samples, merged_from=len(profiles),
                       lengths=[n for p in profiles for n in p.calibration.get("lengths", [])],
                       trace_seconds=round(sum(p.calibration.get("trace_seconds", 0.0) for p in profiles), 2),
                       data=datas[0] if all(d == datas[0] for d in datas) else {"kind": "merged", "parts": datas},
                       methods={"trace": first.calibration["methods"]["trace"]})
    return build_profile(stats, dict(first.model), calibration)


def calibrate(model, tokenizer, method: str, *, profile: Profile | None = None, fraction: float | None = None,
              options: dict | None = None, on_progress=None) -> Profile:
    """Run a registered calibration method and return `profile` (or a new one) with its section.

    Head methods (a `calibrate.heads.HeadsResult`) write `heads.<method>.*`: continuous score, chosen mask, method
    extras, and set the default policy's `heads` to `<method>:<fraction kept>` (stored as the canonical policy
    string); other methods write their own section
    (`kvquant`: `quant.*` codebooks) and leave the policy alone. Provenance goes under
    kvtool.calibration["methods"][method] (head methods add their `windows`)."""
    import calibrate as registry
    from calibrate.heads import HeadsResult, check_fraction

    runner_cls = registry.get(method)
    if fraction is not None:
        check_fraction(fraction)
    if profile is not None:
        profile.check_model(model)
    options = dict(options or {})
    preset = options.pop("preset", None)
    try:
        runner = runner_cls.from_preset(preset, **options) if hasattr(runner_cls, "from_preset") \
            else runner_cls(**options)
    except TypeError as exc:
        raise KvtoolError(f"bad option for --method {method}: {exc}") from None
    start = time.perf_counter()
    result = runner.run(model, tokenizer, profile=profile, fraction=fraction, on_progress=on_progress)
    if profile is None:
        profile = Profile(tensors={}, model=model_meta(model, name=getattr(model, "kvtool_name", None)),
                          calibration={"data": {"kind": method}, "samples": 0, "lengths": [], "methods": {},
                                       "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                                       "kvtool_version": __version__},
                          policy=dict(DEFAULT_POLICY))
    heads = isinstance(result, HeadsResult)
    tensors = {k: v for k, v in profile.tensors.items() if not k.startswith(result.replaces)}
    tensors.update({f"{result.section}.{name}": t for name, t in result.tensors.items()})
    calibration = dict(profile.calibration)
    entry = {**result.params, **({"windows": result.windows} if heads else {}),
             "seconds": round(time.perf_counter() - start, 2)}
    calibration["methods"] = {**calibration.get("methods", {}), method: entry}
    policy = dict(profile.policy)
    if heads:
        from kvtool.policy import Policy

        kept = result.tensors["mask"].float().mean().item()
        policy = Policy.from_profile(profile.policy).replace(heads=method, fraction=float(f"{kept:.4g}"),
                                                             seed=0).to_profile()
    return Profile(tensors=tensors, model=profile.model, calibration=calibration, policy=policy)
