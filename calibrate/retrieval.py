"""Retrieval heads by copy score (Wu et al., "Retrieval Head Mechanistically Explains Long-Context Factuality",
arXiv 2404.15574).

On needle samples, while the model (teacher-forced) produces each answer token, a query head scores a hit when its
top-attended token is a needle token equal to the token being produced; the score is hits / answer tokens, over the
samples whose answers the model recalls (> 50% of answer tokens predicted). Heads above `threshold` (0.1 in the
paper) are retrieval heads. The score comes from kvtool's trace (`heads.copy_score`, already the max over each
KV group); an existing profile traced on passkey data is reused instead of tracing again, unless `reuse=False`
(the CLI sets it when --samples or --seq-len is given: then new passkey samples are traced with those).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from calibrate import register
from calibrate.heads import HeadsResult, top_fraction
from kvtool.errors import KvtoolError
from kvtool.sections import COPY_SCORE


@register("retrieval")
@dataclass
class Retrieval:
    threshold: float = 0.1
    samples: int = 8
    seq_len: int = 1024
    needles: int = 3
    seed: int = 42
    reuse: bool = True
    shards = True          # under torchrun its trace of new passkey samples is split over the ranks (kvtool.distributed)

    def reuses(self, profile) -> bool:
        """True when the copy scores come from `profile`'s own passkey trace (nothing is traced)."""
        return self.reuse and profile is not None and COPY_SCORE in profile \
            and profile.calibration.get("data", {}).get("kind") == "passkey"

    def run(self, model, tokenizer, profile=None, fraction: float | None = None, on_progress=None) -> HeadsResult:
        score, source = self._scores(model, tokenizer, profile, on_progress)
        mask = (score > self.threshold).to(torch.uint8) if fraction is None else top_fraction(score, fraction)
        params = {"threshold": self.threshold, "source": source, "fraction": fraction}
        if source == "trace":
            from kvtool import distributed

            params.update(samples=self.samples, seq_len=self.seq_len, needles=self.needles, seed=self.seed,
                          world_size=distributed.world_size())
        else:
            params.update(samples=profile.calibration.get("samples"), lengths=profile.calibration.get("lengths"))
        return HeadsResult("retrieval", {"score": score, "mask": mask}, params)

    def _scores(self, model, tokenizer, profile, on_progress):
        if self.reuses(profile):
            return profile[COPY_SCORE].float(), "profile"
        from kvtool import distributed
        from kvtool.data import passkey_samples
        from kvtool.trace import TraceConfig, check_lengths

        cfg = TraceConfig(sink=min(64, self.seq_len // 8), recent=min(256, self.seq_len // 4))
        check_lengths(model, self.seq_len, cfg)
        samples = passkey_samples(tokenizer, self.samples, self.seq_len, n_needles=self.needles, seed=self.seed)
        stats = distributed.trace(model, cfg, samples, on_sample=on_progress)     # this rank's shard, all-reduced
        recall = stats.acc["recall"]
        if recall.count[0] > 0 and stats.acc["copy"].count.max() == 0:
            raise KvtoolError("the model recalled none of the passkeys, so no copy score exists; "
                              "try shorter --seq-len or fewer needles")
        return stats.derive()[COPY_SCORE], "trace"


# -- contract (calibrate.contract): options, sections, summary --------------------------------------------------------
from calibrate import contract as C  # noqa: E402


def _retrieval_prepare(options: dict) -> dict:
    """--samples or --seq-len given: trace new passkey samples instead of reusing the profile's trace."""
    return {**options, "reuse": not ({"samples", "seq_len"} & options.keys())}


Retrieval.contract = C.Contract(
    about="retrieval heads by copy score on passkey data (Retrieval Head, arXiv 2404.15574); reuses a --profile "
          "traced on passkey data unless --samples or --seq-len is given",
    options=(C.Option("threshold", "--threshold", "copy score above which a head is a retrieval head",
                      check=C.unit("--threshold")),
             C.samples("passkey samples to trace"), C.seq_len(), C.seed("random seed of the passkey samples")),
    sections=(C.Section("heads.retrieval.score", "L, H"), C.Section("heads.retrieval.mask", "L, H")),
    summary=C.heads_summary("retrieval"), text=C.heads_text, fraction=True,
    total=lambda r, model: r.samples, prepare=_retrieval_prepare, paper="arXiv 2404.15574")
