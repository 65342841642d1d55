"""The Python API behind `kvtool profile`: trace a model on samples and build a Profile; merge profiles of shards."""

from __future__ import annotations

import datetime as _dt
import hashlib
import time

import torch

from kvtool import __version__
from kvtool.errors import KvtoolError
from kvtool.profile import Profile, model_meta
from kvtool.trace import Dims, TraceConfig, TraceStats, Tracer, check_lengths, config_dict  # noqa: F401

DEFAULT_POLICY = {"policy": "heads=retrieval:0.5"}      # kvtool.policy: the canonical policy string (kvtool.policy)


def profile_model(model, samples, *, config: TraceConfig | None = None, data: dict | None = None, seed: int = 42,
                  name: str | None = None, keep_stats: bool = True, on_sample=None) -> Profile:
    """Trace `samples` (a sequence of kvtool.data.Sample; a SampleStream is made one sample at a time) through
    `model` and return the Profile (not yet saved).

    Inside a torch.distributed process group (torchrun; kvtool.distributed.init) every rank passes the same
    `samples`, traces its shard and gets the all-reduced statistics of all of them: the same profile on every rank
    (rank 0 saves it), with `world_size` and the slowest rank's `trace_seconds` in its calibration record."""
    config = config or TraceConfig()
    if not samples:
        raise KvtoolError("zero samples: nothing to profile (raise --samples, or give a longer data file)")
    streamed = hasattr(samples, "length")             # a kvtool.data.SampleStream: lengths known, samples made lazily
    lengths = [samples.length(i) if streamed else int(samples[i].input_ids.numel()) for i in range(len(samples))]
    for n in sorted(set(lengths)):
        check_lengths(model, n, config)
    from kvtool import distributed

    start = time.perf_counter()
    stats = distributed.trace(model, config, samples, on_sample=on_sample)     # this rank's shard, all-reduced
    seconds = distributed.max_over_ranks(time.perf_counter() - start, distributed._collective_device(model))
    calibration = {
        "data": data or {"kind": "unknown"},
        "samples": len(samples),
        "lengths": lengths,
        "seed": seed,
        "methods": {"trace": config_dict(config)},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "kvtool_version": __version__,
        "trace_seconds": round(seconds, 2),
        "world_size": distributed.world_size(),
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


def _stats_digest(profile: Profile) -> str:
    """sha256 of a profile's raw statistics: two shards with equal statistics traced the same data."""
    h = hashlib.sha256()
    for name in sorted(k for k in profile.tensors if k.startswith("stats.")):
        t = profile.tensors[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def merge_profiles(*profiles: Profile, names: list[str] | None = None) -> Profile:
    """Merge profiles traced on disjoint shards of data (same model, same settings) into one.

    The result equals the profile of all the data traced at once (see TraceStats for the float tolerance). Only
    the trace is merged: calibration sections (`heads.<method>.*`) are not carried over; calibrate the merged profile.
    Refused: fewer than two shards, the same statistics twice (the same file, or the same samples traced twice),
    other models, other trace settings, other sample lengths, NaN in the raw statistics. `names` (file names) only
    label the errors.
    """
    if len(profiles) < 2:
        raise KvtoolError("give at least two profiles to merge")
    names = list(names) if names is not None else [f"profile {i + 1}" for i in range(len(profiles))]
    first = profiles[0]
    for p, name in zip(profiles, names):
        if p.model.get("fingerprint") != first.model.get("fingerprint"):
            raise KvtoolError("cannot merge profiles of different models (fingerprints differ)")
        trace = p.calibration.get("methods", {}).get("trace") or {}
        ref = first.calibration.get("methods", {}).get("trace") or {}
        differ = [f"{k} {trace.get(k)} vs {ref.get(k)}" for k in sorted(set(trace) | set(ref)) if trace.get(k) != ref.get(k)]
        if differ:
            raise KvtoolError(f"cannot merge profiles traced with different settings ({name} vs {names[0]}: "
                              f"{'; '.join(differ)})")
        lengths = sorted(set(p.calibration.get("lengths", [])))
        if lengths != sorted(set(first.calibration.get("lengths", []))):
            raise KvtoolError(f"cannot merge shards of different sequence lengths: {name} has samples of "
                              f"{_lengths(lengths)} tokens, {names[0]} of "
                              f"{_lengths(sorted(set(first.calibration.get('lengths', []))))}")
        for key, t in p.tensors.items():
            if key.startswith("stats.") and t.is_floating_point() and bool(torch.isnan(t).any()):
                raise KvtoolError(f"cannot merge {name}: its raw statistic {key} contains NaN")
    all_stats = [stats_of(p) for p in profiles]          # a profile without raw statistics: refused here
    digests = [_stats_digest(p) for p in profiles]
    for j, d in enumerate(digests):
        if d in digests[:j]:
            raise KvtoolError(f"{names[j]} has the same statistics as {names[digests.index(d)]} (the same samples "
                              "traced twice); merging them would count that data twice")
    stats = all_stats[0]
    for other in all_stats[1:]:
        stats.merge(other)
    datas = [p.calibration.get("data") for p in profiles]
    calibration = dict(first.calibration)
    calibration.pop("seed", None)
    calibration.pop("world_size", None)
    calibration.update(samples=stats.samples, merged_from=len(profiles),
                       seeds=[s for p in profiles for s in p.calibration.get("seeds", [p.calibration.get("seed")])],
                       lengths=[n for p in profiles for n in p.calibration.get("lengths", [])],
                       trace_seconds=round(sum(p.calibration.get("trace_seconds", 0.0) for p in profiles), 2),
                       data=datas[0] if all(d == datas[0] for d in datas) else {"kind": "merged", "parts": datas},
                       methods={"trace": first.calibration["methods"]["trace"]})
    return build_profile(stats, dict(first.model), calibration)


def _lengths(values: list[int]) -> str:
    return ", ".join(map(str, values)) or "unknown"


def make_runner(method: str, options: dict | None = None):
    """The method object of registered `method` with `options` ({field: value}; `preset` for a method with
    presets); an option the method does not have, or a bad value, is a one-line KvtoolError. Needs no model."""
    import dataclasses

    import calibrate as registry

    runner_cls = registry.get(method)
    options = dict(options or {})
    preset = options.pop("preset", None)
    known = {f.name for f in dataclasses.fields(runner_cls)}
    unknown = sorted(set(options) - known)
    if unknown or (preset is not None and not hasattr(runner_cls, "from_preset")):
        name = unknown[0] if unknown else "preset"
        raise KvtoolError(f"bad option for --method {method}: {name!r} is not one of its options")
    try:
        return runner_cls.from_preset(preset, **options) if hasattr(runner_cls, "from_preset") \
            else runner_cls(**options)
    except TypeError as exc:
        raise KvtoolError(f"bad option for --method {method}: {exc}") from None


def _check_sections(method: str, contract, runner, result, model) -> None:
    """A method writes exactly the sections its contract declares, with the declared shapes (a bug otherwise)."""
    from kvtool.modelinfo import Dims

    d = Dims.of(model)
    expected = contract.expected(runner, d.layers, d.kv_heads, d.head_dim)
    written = {f"{result.section}.{n}": tuple(t.shape) for n, t in result.tensors.items()}
    if written != expected:
        wrong = sorted(set(written.items()) ^ set(expected.items()))
        raise RuntimeError(f"calibration method {method} broke its contract: {wrong[:4]}")


def calibrate(model, tokenizer, method: str, *, profile: Profile | None = None, fraction: float | None = None,
              options: dict | None = None, on_progress=None) -> Profile:
    """Run a registered calibration method and return `profile` (or a new one) with its section.

    Head methods (a `calibrate.heads.HeadsResult`) write `heads.<method>.*`: continuous score, chosen mask, method
    extras, and set the default policy's `heads` to `<method>:<fraction kept>` (stored as the canonical policy
    string); other methods write their own section
    (`kvquant`: `quant.*` codebooks) and leave the policy alone. Provenance goes under
    kvtool.calibration["methods"][method] (head methods add their `windows`). The method's contract
    (calibrate.contract) says which options it takes (`options`: {field: value}), whether it needs `profile`, and
    which tensors it writes (checked here); `calibrate.get(method).contract.summary(profile)` summarises the result."""
    from calibrate.contract import contract_of
    from calibrate.heads import HeadsResult, check_fraction

    runner = make_runner(method, options)
    contract = contract_of(type(runner))
    if fraction is not None:
        if not contract.fraction:
            raise KvtoolError(f"--retrieval-fraction does not apply to {method}")
        check_fraction(fraction)
    if profile is None and contract.requires_profile(runner):
        raise KvtoolError(f"{method} needs a profile's {contract.needs}: give --profile (made by `kvtool profile`)")
    if profile is not None:
        profile.check_model(model)
    start = time.perf_counter()
    result = runner.run(model, tokenizer, profile=profile, fraction=fraction, on_progress=on_progress)
    _check_sections(method, contract, runner, result, model)
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


def set_policy(model, profile: Profile, policy: str) -> Profile:
    """`profile` with `policy` as its default (kvtool.policy: the canonical string), checked first by building the
    CompressedCache it describes on `model`: a policy the profile or the model cannot serve (heads=<method> not
    calibrated, pod without the pod section, bits the layer cannot take) is refused here, not at the next run."""
    from kvtool.cache import CompressedCache, _profile_method
    from kvtool.policy import Policy

    profile.check_model(model)
    parsed = Policy.parse(policy, _profile_method(profile))
    CompressedCache(model, profile, parsed)
    return Profile(tensors=dict(profile.tensors), model=profile.model, calibration=profile.calibration,
                   policy=parsed.to_profile())

