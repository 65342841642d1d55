"""`kvtool bench --reuse-prefix`: samples whose prompts start alike (the pass-key and copy tasks put their needle into
the same filler, so every prompt starts with the same template and filler up to its needle) resume their chunked
prefill from a saved cache state instead of recomputing the shared start.

A prompt is prefilled in chunks of `chunk` tokens from position 0 (kvtool.cache.prefill). The cache's state after
the chunks that end at a boundary b (a multiple of `chunk`) depends only on the first b tokens, so a later sample
whose first b tokens are the same can start from a copy of that state and run its chunks from b: the same forwards
on the same inputs, so the same numbers (tests/test_prefix_reuse.py checks every store for exact equality). This is
the transformers "prefix caching" idea (a deep copy of a prefilled cache), applied at chunk boundaries only, so no
sample's chunking changes.

The plan is made once from all the prompts: sample j resumes from the largest boundary b < len(prompt j) that an
earlier sample shares with it (its longest common prefix, rounded down to a chunk); a sample saves a copy of its
state when it passes a boundary a later sample will resume from, and a copy is dropped after its last use. On the
40 passkey-chat samples of 1-4k tokens this skips about a third of the prefill tokens (`reused_tokens` in a row;
prefill tok/s counts only the tokens run).
"""

from __future__ import annotations

import copy
import hashlib

import torch


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the longest common prefix of two id vectors a [Ta], b [Tb]."""
    n = min(a.numel(), b.numel())
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if differ.numel() else n


class PrefixReuse:
    """One plan for a list of prompts (each [T], in the order they will be prefilled); `prefill(i, ...)` runs prompt i."""

    def __init__(self, prompts: list[torch.Tensor], chunk: int):
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1 token (got {chunk})")
        self.chunk = chunk
        self.prompts = [p.reshape(-1).cpu() for p in prompts]
        self.start = [0] * len(self.prompts)                 # the boundary each prompt resumes from (0: from scratch)
        self.last_use: dict[tuple, int] = {}                 # state key -> the last prompt resuming from it
        for j, pj in enumerate(self.prompts):
            best = 0
            for i in range(j):
                shared = min(common_prefix(self.prompts[i], pj), pj.numel() - 1)   # at least one token left to run
                best = max(best, shared // chunk * chunk)
            self.start[j] = best
            if best:
                self.last_use[self._key(pj, best)] = j
        self.states: dict[tuple, object] = {}                # key -> a saved cache (a deep copy)
        self.reused_tokens = 0                               # tokens not run, over every prefill so far
        self.last_reused = 0                                 # ... in the last prefill

    @staticmethod
    def _key(ids: torch.Tensor, b: int) -> tuple:
        return b, hashlib.sha1(ids[:b].numpy().tobytes()).hexdigest()

    def planned_reuse(self) -> int:
        """Tokens the plan skips over all prompts."""
        return sum(self.start)

    def prefill(self, model, i: int, ids: torch.Tensor, cache, finish: bool = True):
        """Prefill prompt i (ids [1, T], equal to the i-th planned prompt) into `cache`, from a saved state where the
        plan says so. → (the last position's logits [1, V], the cache now holding the prompt: `cache` itself, or a
        copy of a saved state that replaces it). `finish` as kvtool.cache.prefill."""
        from kvtool.cache import prefill

        flat = ids.reshape(-1).cpu()
        if not torch.equal(flat, self.prompts[i]):
            raise ValueError(f"prompt {i} is not the one the prefix plan was made for")
        for key in [k for k, last in self.last_use.items() if last < i]:      # nobody resumes from these any more
            self.states.pop(key, None)
            del self.last_use[key]
        begin = self.start[i]
        if begin:
            key = self._key(flat, begin)
            if self.last_use[key] == i:                                        # its last use: no copy needed
                cache = self.states.pop(key)
                del self.last_use[key]
            else:
                cache = copy.deepcopy(self.states[key])
        # the boundaries past `begin` where this prompt's state is one a later prompt resumes from (the keys still
        # planned belong to this and later prompts: the earlier ones were dropped above)
        wanted = [b for b in range(begin + self.chunk, flat.numel(), self.chunk) if self._key(flat, b) in self.last_use]
        logits, at = None, begin
        for b in wanted + [flat.numel()]:
            logits = prefill(model, ids[:, at:b], cache, self.chunk, finish=False)          # [1, V]
            at = b
            key = self._key(flat, b)
            if key in self.last_use and key not in self.states:
                self.states[key] = copy.deepcopy(cache)
        done = getattr(cache, "finish_prefill", None)
        if finish and done is not None:
            done()
        self.last_reused = begin
        self.reused_tokens += begin
        return logits, cache
