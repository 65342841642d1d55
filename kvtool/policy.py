"""Compression policy strings: `heads=duo:0.5,k=4,v=4,krope=pre`, and the one table of their fields.

A policy is comma-separated `key=value` fields, every field optional. Each field belongs to the store that reads it
(kvtool/stores/*.py declares its fields with `register_field`); this module holds the table, parses a string against
it, and prints the canonical string back. `kvtool.policy.fields()` is the table (name, parser, default, help);
`field_table_markdown()` is the list in docs/runtime.md (a test keeps the two equal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from kvtool.errors import KvtoolError

QUANT_BITS = (2, 3, 4, 8, 16)
CLIP_LEVELS = (1.0, 0.999, 0.995, 0.99)
DTYPES = ("auto", "model", "fp16", "bf16", "fp32")


@dataclass(frozen=True)
class Field:
    """One policy field. `parse(text, default_method)` turns the text after `name=` into {attribute: value} (one
    field may set several attributes: `heads` sets heads, fraction, seed); `default` holds those attributes'
    defaults; `show(values)` prints the field back (None: leave it out). `values` and `help` are for the docs and
    `kvtool run --help`; `owner` names the store (or `layer`) that reads it."""
    name: str
    parse: Callable[[str, str | None], dict]
    default: dict
    values: str
    help: str
    owner: str
    show: Callable[[dict], str | None] | None = None

    def text(self, values: dict) -> str | None:
        if self.show is not None:
            return self.show(values)
        value = values[self.name]
        if value == self.default[self.name]:
            return None
        return "on" if value is True else "off" if value is False else str(value)


_TABLE: dict[str, Field] = {}


def register_field(*fields: Field) -> None:
    """Add fields to the table (a store module does this at import). Names are unique."""
    for f in fields:
        if f.name in _TABLE and _TABLE[f.name] is not f:
            raise ValueError(f"policy field {f.name!r} is declared twice ({_TABLE[f.name].owner}, {f.owner})")
        _TABLE[f.name] = f


def fields() -> dict[str, Field]:
    """The whole table, in canonical order (importing the stores registers their fields)."""
    import kvtool.stores  # noqa: F401

    return dict(_TABLE)


def simple(name: str, parse: Callable[[str], Any], default, values: str, help: str, owner: str) -> Field:
    """A field that sets one attribute of its own name."""
    return Field(name, lambda text, _method: {name: parse(text)}, {name: default}, values, help, owner)


class Policy:
    """A parsed policy: one attribute per field attribute (policy.k, policy.sink, policy.heads, policy.fraction ...).
    Immutable, comparable, hashable; `str(policy)` is the canonical string (heads always, then fields that differ
    from their defaults, in table order)."""

    __slots__ = ("_values",)

    def __init__(self, **values):
        table = fields()
        merged = {k: v for f in table.values() for k, v in f.default.items()}
        unknown = set(values) - set(merged)
        if unknown:
            raise TypeError(f"unknown policy attribute(s): {', '.join(sorted(unknown))}")
        merged.update(values)
        object.__setattr__(self, "_values", merged)

    def __getattr__(self, name: str):
        try:
            return object.__getattribute__(self, "_values")[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        raise AttributeError("Policy is immutable; use replace()")

    def __copy__(self) -> "Policy":               # immutable: a copy is the same object
        return self

    def __deepcopy__(self, memo) -> "Policy":     # (a cache's deep copy shares its policy: kvtool.prefix_reuse)
        return self

    def __eq__(self, other) -> bool:
        return isinstance(other, Policy) and self._values == other._values

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._values.items(), key=lambda kv: kv[0])))

    def __repr__(self) -> str:
        return f"Policy({str(self)!r})"

    def replace(self, **values) -> "Policy":
        return Policy(**{**self._values, **values})

    def values(self) -> dict:
        return dict(self._values)

    @property
    def quantized(self) -> bool:
        return self.k < 16 or self.v < 16

    @classmethod
    def parse(cls, text: str | None, default_method: str | None = None) -> "Policy":
        """Parse a policy string; `default_method` names the method a bare `heads=<fraction>` refers to."""
        if text is None or not text.strip():
            return cls()
        table = fields()
        values: dict = {}
        seen: set[str] = set()
        for part in text.split(","):
            if "=" not in part:
                raise KvtoolError(f"policy field {part.strip()!r} is not key=value (e.g. heads=duo:0.5,k=4,v=4)")
            key, value = (s.strip() for s in part.split("=", 1))
            if key in seen:
                raise KvtoolError(f"policy field {key!r} is given twice")
            seen.add(key)
            if key not in table:
                raise KvtoolError(f"unknown policy field {key!r} (known: {', '.join(table)})")
            values.update(table[key].parse(value, default_method))
        return cls(**values)

    @classmethod
    def from_profile(cls, stored: dict | None) -> "Policy":
        """The default policy a profile records in `kvtool.policy`: {"policy": "<canonical string>"}; older profiles
        hold {heads, sink, recent, k_bits, v_bits}, which read the same way."""
        stored = stored or {}
        if "policy" in stored:
            return cls.parse(stored["policy"], default_method=_method_of(stored["policy"]))
        parts = [f"heads={stored['heads']}"] if stored.get("heads") else []
        parts += [f"{k}={stored[k]}" for k in ("sink", "recent") if k in stored]
        parts += [f"{k[0]}={stored[k]}" for k in ("k_bits", "v_bits") if k in stored]
        return cls.parse(",".join(parts))

    def to_profile(self) -> dict:
        """What a profile stores as `kvtool.policy`."""
        return {"policy": str(self)}

    def __str__(self) -> str:
        """The canonical policy string (heads always, then the fields that differ from the defaults)."""
        out = []
        for f in fields().values():
            text = f.text(self._values)
            if text is not None:
                out.append(f"{f.name}={text}")
        return ",".join(out)


def _method_of(text: str) -> str | None:
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key.strip() == "heads":
            name = value.strip().split(":")[0]
            return name if name and not (name[0].isdigit() or name[0] == ".") else None
    return None


def _show_heads(values: dict) -> str:
    heads = values["heads"] if values["fraction"] is None else f"{values['heads']}:{values['fraction']:g}"
    if values["heads"] == "random" and values["seed"]:
        heads += f":{values['seed']}"
    return heads


HEADS = Field(
    "heads", lambda text, method: _heads(text, method), {"heads": "all", "fraction": None, "seed": 0},
    "`all`, `none`, `<method>`, `<method>:<f>`, `<f>`, `random:<f>[:seed]`",
    "Which KV heads are retrieval heads (they keep every token, in the quantized store). `<method>` takes that "
    "method's mask; `<method>:<f>` takes the top fraction f of its score (a global quantile); a bare `<f>` means the "
    "profile's own method. The other heads are streaming heads (the window store).", "layer", _show_heads)
DTYPE = simple("dtype", lambda t: _choice("dtype", t, DTYPES), "auto", "`auto`, `model`, `fp16`, `bf16`, `fp32`",
               "Storage of the unquantized parts. `auto` is 16-bit: the model's dtype if that is 16-bit, else "
               "float16.", "layer")


def field_table_markdown() -> str:
    """The policy field table as markdown (docs/runtime.md carries exactly this)."""
    rows = ["| field | values | default | store | meaning |", "|---|---|---|---|---|"]
    for f in fields().values():
        default = f.default[f.name]
        default = "on" if default is True else "off" if default is False else "unset" if default is None else default
        rows.append(f"| `{f.name}` | {f.values} | `{default}` | {f.owner} | {f.help} |")
    return "\n".join(rows)


def _count(key: str, value: str, least: int) -> int:
    try:
        n = int(value)
    except ValueError:
        raise KvtoolError(f"policy field {key!r}: {value!r} is not a whole number") from None
    if n < least:
        raise KvtoolError(f"policy field {key!r} must be at least {least} (got {n})")
    return n


def _bits(key: str, value: str) -> int:
    text = value.lower().removesuffix("bit").removesuffix("bits")
    try:
        n = int(text)
    except ValueError:
        raise KvtoolError(f"policy field {key!r}: {value!r} is not a bit width (2, 3, 4, 8 or 16)") from None
    if n not in QUANT_BITS:
        raise KvtoolError(f"policy field {key!r}: {n} bits is not supported (2, 3, 4, 8 or 16)")
    return n


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise KvtoolError(f"policy field {key!r}: {value!r} is not one of {', '.join(allowed)}")
    return value


def _number(key: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise KvtoolError(f"policy field {key!r}: {text!r} is not a number") from None


def _clip(value: str) -> float:
    x = _number("kclip", value)
    if x not in CLIP_LEVELS:
        raise KvtoolError(f"policy field 'kclip': {value} is not a calibrated level ({', '.join(map(str, CLIP_LEVELS))})")
    return x


def _fraction(text: str) -> float:
    f = _number("heads", text)
    if not 0.0 <= f <= 1.0:
        raise KvtoolError(f"policy field 'heads': fraction {f} is outside [0, 1]")
    return f


def _heads(value: str, default_method: str | None) -> dict:
    parts = value.split(":")
    name = parts[0]
    if not name:
        raise KvtoolError("policy field 'heads' is empty")
    if name in ("all", "none"):
        if len(parts) > 1:
            raise KvtoolError(f"policy field 'heads': {name!r} takes no fraction")
        return {"heads": name}
    if name[0].isdigit() or name[0] in ".-+":                           # heads=0.5: the profile's own method
        if len(parts) > 1:
            raise KvtoolError(f"policy field 'heads': {value!r} has too many ':' parts")
        fraction = _fraction(name)
        if default_method is None:
            raise KvtoolError("policy field 'heads': a bare fraction needs a profile with a calibrated method "
                              "(or name one, e.g. heads=duo:0.5)")
        return {"heads": default_method, "fraction": fraction}
    if not name.isidentifier():
        raise KvtoolError(f"policy field 'heads': {name!r} is neither a fraction nor a method name (give all, none, "
                          "a fraction, <method>, <method>:<fraction> or random:<fraction>)")
    out = {"heads": name}
    if len(parts) > 1:
        out["fraction"] = _fraction(parts[1])
    if name == "random":
        if "fraction" not in out:
            raise KvtoolError("policy field 'heads': random needs a fraction, e.g. heads=random:0.5")
        if len(parts) > 2:
            out["seed"] = _count("heads seed", parts[2], least=0)
            if out["seed"] > 2**63 - 1:
                raise KvtoolError(f"policy field 'heads': random seed {out['seed']} is above 2**63 - 1")
    elif len(parts) > 2:
        raise KvtoolError(f"policy field 'heads': {value!r} has too many ':' parts")
    return out


DOCS_START, DOCS_END = "<!-- policy-fields:start -->", "<!-- policy-fields:end -->"


def write_docs(path: str = "docs/runtime.md") -> bool:
    """Rewrite the field table between the markers in docs/runtime.md from the table; True when it changed."""
    from pathlib import Path

    p = Path(path)
    text = p.read_text()
    a, b = text.index(DOCS_START) + len(DOCS_START), text.index(DOCS_END)
    new = text[:a] + "\n" + field_table_markdown() + "\n" + text[b:]
    if new != text:
        p.write_text(new)
    return new != text


if __name__ == "__main__":      # python -m kvtool.policy: print the table; --write-docs: rewrite docs/runtime.md's copy
    import sys

    import kvtool.policy as table                # the registered module, not this __main__ copy

    if "--write-docs" in sys.argv[1:]:
        print("docs/runtime.md updated" if table.write_docs() else "docs/runtime.md already lists the table")
    else:
        print(table.field_table_markdown())
