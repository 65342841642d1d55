"""Retrieval heads by several signals at once: the mean of each signal's normalised rank (rank averaging, a Borda
count). Issue 14: no single signal ranks the embedded model's heads well at 25% (docs/BENCHMARKS.md), and the
signals are independent measurements of one property, so an average of their ranks is less noisy than any one.

Signals (each a [L, H_kv] tensor a profile already holds; higher = the head needs distant tokens more):
  duo        DuoAttention's gates (Xiao et al., arXiv 2410.10819), heads.duo.gate
  pull       duo's pull: the mean -d(distillation loss)/d(gate) over its training, heads.duo.pull (calibrate/duo.py)
  copy       the trace's Retrieval-Head copy score (Wu et al., arXiv 2404.15574), heads.copy_score
  retrieval  the retrieval method's score, heads.retrieval.score
  razor      RazorAttention's echo + induction (Tang et al., arXiv 2407.15891), heads.razor.score
  echo, induction   its two parts alone, heads.razor.echo / heads.razor.induction
  distant    1 - the trace's attention mass on the sink + recent window, 1 - heads.streaming_mass
Ties share the mean of their ranks; a rank is divided by (heads - 1), so every signal weighs the same whatever its
scale. The score is the mean over the signals; the mask keeps its top `fraction` of KV heads (global quantile, the
runtime's own selection, kvtool.select.top_fraction); default 0.25. Nothing runs on the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from calibrate import register
from calibrate.heads import HeadsResult, check_fraction, top_fraction
from kvtool.errors import KvtoolError
from kvtool.sections import COPY_SCORE, STREAMING_MASS

SIGNALS = {"duo": "heads.duo.gate", "pull": "heads.duo.pull", "copy": COPY_SCORE,
           "retrieval": "heads.retrieval.score", "razor": "heads.razor.score", "echo": "heads.razor.echo", "induction": "heads.razor.induction",
           "distant": STREAMING_MASS}
MADE_BY = {"pull": "duo"}                # signals another method's run writes
FLIPPED = {"distant"}                     # signals whose tensor is read as 1 - value


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Normalised ranks in [0, 1] of the entries of `x` (0 = lowest; ties get the mean of their ranks)."""
    v = x.flatten().double()                                                         # [N]
    less = (v[:, None] > v[None, :]).sum(1).double()
    equal = (v[:, None] == v[None, :]).sum(1).double()
    r = (less + (equal - 1) / 2) / max(v.numel() - 1, 1)
    return r.view_as(x).float()


@register("combo")
@dataclass
class Combo:
    signals: str = "duo,copy,razor"
    keep: float = 0.25

    def names(self) -> list[str]:
        out = [s.strip() for s in str(self.signals).split(",") if s.strip()]
        bad = [s for s in out if s not in SIGNALS]
        if len(out) < 2 or bad or len(set(out)) != len(out):
            raise KvtoolError(f"combo --signals {self.signals!r}: give two or more different signals separated by "
                              f"commas, from {', '.join(SIGNALS)}")
        return out

    def __post_init__(self) -> None:
        self.names()
        check_fraction(self.keep)

    def reads(self) -> tuple[str, ...]:
        return tuple(SIGNALS[s] for s in self.names())

    def run(self, model=None, tokenizer=None, profile=None, fraction: float | None = None,
            on_progress=None) -> HeadsResult:
        if profile is None:
            raise KvtoolError("combo ranks the signals a profile holds: give --profile")
        each = {}
        for name in self.names():
            key = SIGNALS[name]
            if key not in profile:
                raise KvtoolError(f"profile has no {key}: combo's signal {name} needs it (run `kvtool calibrate "
                                  f"--method {MADE_BY.get(name, name)}` or `kvtool profile` first)")
            x = profile[key].float()                                                  # [L, H_kv]
            each[name] = ranks(1 - x if name in FLIPPED else x)
        score = torch.stack(list(each.values())).mean(0)                              # [L, H_kv]
        keep = self.keep if fraction is None else fraction
        mask = top_fraction(score, keep)
        agree = {n: round(float(torch.corrcoef(torch.stack([r.flatten(), score.flatten()]))[0, 1]), 4)
                 for n, r in each.items()}
        params = {"signals": self.names(), "fraction": keep, "rank_correlation_with_score": agree}
        if on_progress is not None:
            on_progress(1)
        return HeadsResult("combo", {"score": score, "mask": mask}, params)


# -- contract (calibrate.contract): options, sections, summary --------------------------------------------------------
from calibrate import contract as C  # noqa: E402


def _combo_summary(profile) -> dict:
    out = C.heads_summary("combo")(profile)
    params = profile.calibration["methods"]["combo"]
    out.update(signals=params["signals"], rank_correlation_with_score=params["rank_correlation_with_score"])
    return out


def _combo_text(s: dict) -> str:
    corr = ", ".join(f"{k} {v:.2f}" for k, v in s["rank_correlation_with_score"].items())
    return C.heads_text(s) + f" (mean rank of {', '.join(s['signals'])}; rank correlation with it: {corr})"


Combo.contract = C.Contract(
    about="retrieval heads by the mean rank of several signals in the profile (duo gate, copy score, razor "
          "echo/induction, distant attention mass)",
    options=(C.Option("signals", "--signals", "comma-separated signals to rank-average: "
                      + ", ".join(SIGNALS)),),
    sections=(C.Section("heads.combo.score", "L, H"), C.Section("heads.combo.mask", "L, H")),
    summary=_combo_summary, text=_combo_text, fraction=True, needs_profile=True,
    needs="head signals (heads.duo.gate, heads.copy_score, heads.razor.*, ...)", reads=lambda r: r.reads(),
    paper="arXiv 2410.10819, 2404.15574, 2407.15891")
