"""What a calibration method promises: its options, the sections it writes, what it needs, how it reports.

Every registered method class carries `contract = Contract(...)`. `kvtool calibrate` builds its options, its
pre-load checks, its progress bar and its summary from it, and kvtool.api.calibrate runs any method through it:

  options        Option(field, flag, help): the method's dataclass field `field`, set from the CLI flag `flag`
                 (flags with one meaning are shared between methods: --samples, --seq-len, --data, ...). Type and
                 default come from the dataclass; `parse` turns the CLI value into the field's value, `check`
                 refuses a bad one before the model loads (the dataclass's own __post_init__ checks the rest).
  sections       Section(name, shape): every tensor the method writes, with its shape over L (layers), H (KV
                 heads), D (head_dim) and the method's fields (`2**b` for each b of `bits`, with `over="bits"`);
                 `when="heldout"`: written only when that field is truthy.
  needs_profile  True (or a function of the method object) when the method reads a traced profile; `needs` says
                 what it reads from it, for the one-line refusal.
  fraction       whether --retrieval-fraction applies (head methods).
  total          progress-bar total: a function of (method object, model).
  summary        summary(profile) -> dict (JSON-able), and text(summary) -> one line for humans.
  reads          profile tensors the method reads (or a function of the method object giving them): a --profile
                 without one is refused from its header, before the model loads.
  check          optional check(method object) before the model loads (files the options name, ...).
  prepare        optional: the options the CLI was given -> the options the method gets (retrieval: reuse the
                 profile's trace unless --samples / --seq-len are given).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from kvtool.errors import KvtoolError

# flags every method takes, or the command itself: never "does not apply"
COMMON_FLAGS = ("--method", "--profile", "--output", "--dtype", "--device-map", "--max-memory", "--json")


@dataclass(frozen=True)
class Option:
    field: str                                 # keyword of the method's dataclass (or `preset`)
    flag: str                                  # CLI flag, e.g. "--samples"
    help: str
    parse: Callable[[Any], Any] | None = None   # CLI value -> field value
    check: Callable[[Any], Any] | None = None   # refuse a bad CLI value (before parse), before the model loads
    default: str | None = None                  # the default in words, where the dataclass's is not it (presets)


@dataclass(frozen=True)
class Section:
    name: str                                  # full tensor name; `{b}` is filled from `over`
    shape: str                                 # e.g. "L, H, D"; symbols: L, H, D and the method's fields, b
    over: str | None = None                    # a field whose items expand `{b}` (kvquant: bits)
    when: str | None = None                    # a field: the section is written only when it is truthy


@dataclass(frozen=True)
class Contract:
    about: str                                  # one line: what the method does
    options: tuple[Option, ...]
    sections: tuple[Section, ...]
    summary: Callable[[Any], dict]
    text: Callable[[dict], str]
    total: Callable[[Any, Any], int] = lambda runner, model: 1
    needs_profile: bool | Callable[[Any], bool] = False
    needs: str = "traced statistics"
    fraction: bool = False
    check: Callable[[Any], None] | None = None
    prepare: Callable[[dict], dict] | None = None   # options the CLI was given -> options for the method
    reads: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = ()   # profile tensors it needs (checked pre-load)
    paper: str = ""

    def flags(self) -> dict[str, Option]:
        return {o.flag: o for o in self.options}

    def requires_profile(self, runner) -> bool:
        return self.needs_profile(runner) if callable(self.needs_profile) else bool(self.needs_profile)

    def required(self, runner) -> tuple[str, ...]:
        """The profile tensors `runner` reads (a --profile without one is refused before the model loads)."""
        return tuple(self.reads(runner) if callable(self.reads) else self.reads)

    def expected(self, runner, layers: int, kv_heads: int, head_dim: int) -> dict[str, tuple[int, ...]]:
        """The tensors `runner` writes, {name: shape}, for a model of these dimensions."""
        env = {k: v for k, v in vars(runner).items() if isinstance(v, (int, float))}
        env.update(L=layers, H=kv_heads, D=head_dim)
        out = {}
        for s in self.sections:
            if s.when is not None and not getattr(runner, s.when):
                continue
            for b in (getattr(runner, s.over) if s.over else [None]):
                shape = tuple(int(eval(d, {"__builtins__": {}}, {**env, "b": b})) for d in s.shape.split(","))
                out[s.name.format(b=b)] = shape
        return out


def contract_of(cls) -> Contract:
    c = getattr(cls, "contract", None)
    if not isinstance(c, Contract):
        raise TypeError(f"calibration method {cls.__name__} declares no calibrate.contract.Contract")
    return c


def defaults(cls) -> dict[str, Any]:
    """The dataclass defaults of a method class {field: default}."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def options_table() -> list[dict]:
    """One row per (method, option): method, flag, field, default, help — what `kvtool calibrate --help` and the
    docs list."""
    import calibrate as registry

    rows = []
    for name in registry.names():
        cls = registry.get(name)
        c, d = contract_of(cls), defaults(cls)
        for o in c.options:
            default = d.get(o.field) if o.default is None else o.default
            rows.append({"method": name, "flag": o.flag, "field": o.field, "default": default, "help": o.help})
        if c.fraction:
            rows.append({"method": name, "flag": "--retrieval-fraction", "field": "fraction", "default": None,
                         "help": "keep this fraction of KV heads (global quantile of the score)"})
    return rows


def _default(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value)


def markdown() -> str:
    """The per-method list of `kvtool calibrate` options and sections, as the docs carry it (tests compare)."""
    import calibrate as registry

    lines = []
    by_method: dict[str, list[dict]] = {}
    for r in options_table():
        by_method.setdefault(r["method"], []).append(r)
    for name in registry.names():
        c = contract_of(registry.get(name))
        opts = ", ".join(f"`{r['flag']}` ({_default(r['default'])})" for r in by_method.get(name, [])) or "none"
        sections = "; ".join(f"`{names}` [{shape}]" for names, shape in _compact(c.sections))
        profile = f"needs `--profile` for its {c.needs}" if c.needs_profile else "`--profile` optional"
        lines.append(f"- `{name}`: {c.about}; {profile}. Options (default): {opts}. Writes {sections}.")
    return "\n".join(lines)


def _braces(items: list[str]) -> str:
    return items[0] if len(items) == 1 else "{" + ",".join(items) + "}"


def _compact(sections) -> list[tuple[str, str]]:
    """Section names grouped for the docs: `lowrank.{key,value}.{mean,eigvals}` per shape (conditional ones alone)."""
    out, groups = [], {}
    for s in sections:
        parts = s.name.split(".")
        if len(parts) != 3 or s.when:
            out.append((s.name + (f" (when {s.when} > 0)" if s.when else ""), s.shape))
            continue
        mids = groups.setdefault(s.shape, {}).setdefault(parts[0], {})
        mids.setdefault(parts[1], []).append(parts[2])
    for shape, heads in groups.items():
        for head, mids in heads.items():
            by_tails: dict[tuple, list[str]] = {}
            for mid, tails in mids.items():
                by_tails.setdefault(tuple(tails), []).append(mid)
            for tails, ms in by_tails.items():
                out.append((f"{head}.{_braces(ms)}.{_braces(list(tails))}", shape))
    return sorted(out, key=lambda r: "(when" in r[0])


def flag_help(flag: str) -> str:
    """The help of one `kvtool calibrate` flag over every method that takes it."""
    import calibrate as registry

    by_text: dict[str, list[str]] = {}                 # methods with the same meaning and default share one entry
    for r in options_table():
        if r["flag"] == flag:
            d = r["default"]
            text = r["help"] + ("" if d is None else f" (default {_default(d)})")
            by_text.setdefault(text, []).append(r["method"])
    return "; ".join(f"{', '.join(names)}: {text}" for text, names in by_text.items()) + "." if by_text else ""


def heads_summary(method: str) -> Callable[[Any], dict]:
    """summary(profile) of a head method: retrieval heads chosen, of how many, the policy it sets."""

    def summary(profile) -> dict:
        mask = profile[f"heads.{method}.mask"]
        return {"method": method, "retrieval_heads": int(mask.sum()), "kv_heads": mask.numel(),
                "policy": profile.policy, "seconds": profile.calibration["methods"][method]["seconds"]}

    return summary


def heads_text(s: dict) -> str:
    return f"{s['method']}: {s['retrieval_heads']} of {s['kv_heads']} KV heads are retrieval heads ({s['seconds']} s)"


def split_ints(flag: str) -> Callable[[str], tuple[int, ...]]:
    def parse(value):
        if isinstance(value, (list, tuple)):
            return tuple(int(v) for v in value)
        try:
            return tuple(int(b) for b in str(value).replace(",", " ").split())
        except ValueError:
            raise KvtoolError(f"{flag} must be comma-separated integers such as 2,3,4 (got {value!r})") from None

    return parse


def at_least(flag: str, least: int) -> Callable[[int], int]:
    from kvtool import checks

    return lambda v: checks.whole(flag, v, least)


def unit(flag: str) -> Callable[[float], float]:
    """Refuse a value outside [0, 1] (NaN too)."""

    def check(v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise KvtoolError(f"{flag} must lie in [0, 1] (got {v})")
        return v

    return check


def samples_check(v: int) -> int:
    from kvtool import checks

    return checks.samples(v)


def seq_len_check(v: int) -> int:
    from kvtool import checks

    return checks.whole("--seq-len", v, 2)


# common option declarations (each method lists the ones it takes; help may differ per method)
def samples(help: str = "calibration samples") -> Option:
    return Option("samples", "--samples", help, check=samples_check)


def seq_len(help: str = "tokens per sample") -> Option:
    return Option("seq_len", "--seq-len", help, check=seq_len_check)


def data(help: str = "'passkey' (built-in) or a .txt / .jsonl file") -> Option:
    return Option("data", "--data", help)


def seed(help: str = "random seed of the calibration data") -> Option:
    from kvtool import checks

    return Option("seed", "--seed", help, check=lambda v: checks.seed(v))


__all__ = ["COMMON_FLAGS", "Contract", "Option", "Section", "contract_of", "defaults", "options_table", "markdown",
           "flag_help", "heads_summary", "heads_text", "split_ints", "at_least", "unit", "samples", "seq_len", "data",
           "seed", "methods"]


def methods() -> list[tuple[str, type]]:
    """(name, class) of every registered method, by name."""
    import calibrate as registry

    return [(name, registry.get(name)) for name in registry.names()]
