"""lm-evaluation-harness with kvtool's compressed cache: `KvtoolLM`, an `HFLM` subclass (lm-eval's own HF model)
whose loglikelihood requests and generations run through a kvtool cache.

lm-eval is an optional dependency (`pip install "kvtool[eval]"`); importing this module does not need it, using
`KvtoolLM` does (one-line KvtoolError when it is absent).

    from kvtool.lm_eval import KvtoolLM
    import lm_eval
    lm = KvtoolLM(profile="smollm2.kv.st", policy="heads=duo:0.5,k=4,v=4,krope=pre")
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"], limit=100)

Scoring (`loglikelihood`, `loglikelihood_rolling`): per request, the context is prefilled into a fresh cache in
chunks (kvtool.cache.prefill: the cache compresses as it fills) and the continuation is teacher-forced through that
cache in one forward — the same measurement as `kvtool run --task nll`. Generation (`generate_until`) hands a fresh
cache to `model.generate`. One sequence at a time (batch size 1): the compressed cache holds one sequence.
`policy="full"` runs the same code with transformers' DynamicCache, the uncompressed reference. `lm.kv_stats` sums
the KV bytes held after each request and what a 16-bit full cache of the same tokens would hold.
"""

from __future__ import annotations

from kvtool.errors import KvtoolError

_CLASS = None


def _hflm():
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise KvtoolError('lm-eval is not installed: pip install "kvtool[eval]" (lm-eval>=0.4)') from None
    return HFLM


def __getattr__(name: str):
    if name == "KvtoolLM":
        return kvtool_lm_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def kvtool_lm_class():
    """The KvtoolLM class (made on first use, registered with lm-eval as model `kvtool`)."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _make_class(_hflm())
    return _CLASS


def _make_class(HFLM):
    import torch
    import torch.nn.functional as F

    class KvtoolLM(HFLM):
        """lm-eval's HFLM with every request run through a kvtool cache.

        pretrained: None (the embedded model), a name / path / .gguf kvtool.load_model reads, or a loaded
        transformers model (then give `tokenizer`). profile: a .kv.st path or a kvtool Profile (default: the shipped
        profile of the default model, if any). policy: a kvtool policy string, or "full" for the uncompressed
        reference (default: the profile's own). Other keyword arguments go to HFLM (e.g. max_length)."""

        def __init__(self, pretrained=None, profile=None, policy: str | None = None, chunk: int = 512,
                     backend: str = "auto", dtype: str = "float32", tokenizer=None, batch_size=1, **kwargs):
            from kvtool.baselines import make_cache
            from kvtool.models import load_model
            from kvtool.profile import Profile

            if str(batch_size) != "1":
                raise KvtoolError(f"KvtoolLM runs one sequence at a time (batch_size 1, got {batch_size})")
            if chunk < 1:
                raise KvtoolError(f"chunk must be at least 1 token (got {chunk})")
            if pretrained is None or isinstance(pretrained, str):
                if profile is None:
                    from kvtool.cli_run import shipped_profile

                    profile = shipped_profile(pretrained)
                model, loaded_tok = load_model(pretrained, dtype=dtype)
                tokenizer = tokenizer or loaded_tok
            else:
                model = pretrained
                if tokenizer is None:
                    raise KvtoolError("give the tokenizer with a loaded model (tokenizer=...)")
            if isinstance(profile, (str, bytes)) or hasattr(profile, "__fspath__"):
                profile = Profile.load(profile, model=model)
            elif profile is not None:
                profile.check_model(model)
            if policy is None:
                if profile is None:
                    raise KvtoolError("give a profile (or policy=\"full\" for the uncompressed cache)")
                from kvtool.policy import Policy

                policy = str(Policy.from_profile(profile.policy))
            super().__init__(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=1, **kwargs)
            self.kv_profile, self.kv_policy, self.kv_chunk = profile, policy, chunk
            self.kv_handle = make_cache(self.model, profile, policy, backend)
            self.kv_stats = {"requests": 0, "kv_bytes": 0.0, "full16_bytes": 0.0}

        def _held(self, cache) -> None:
            self.kv_stats["requests"] += 1
            self.kv_stats["kv_bytes"] += float(self.kv_handle.nbytes(cache))
            self.kv_stats["full16_bytes"] += float(self.kv_handle.full16(cache))

        @torch.inference_mode()
        def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
            """(sum of log p(continuation | context), whether greedy decoding gives the continuation) through a
            fresh cache: chunked prefill of the context, then the continuation teacher-forced in one forward."""
            from kvtool.cache import prefill, with_cache

            whole = (context + continuation)[-(self.max_length + 1):]     # HFLM's left truncation
            n = len(continuation)
            ctx = whole[:-n]
            if not ctx:
                raise KvtoolError(f"a continuation of {n} tokens leaves no context within max_length "
                                  f"{self.max_length}")
            cache = self.kv_handle.fresh()
            dev = self.device
            last = prefill(self.model, torch.tensor([ctx], device=dev), cache, self.kv_chunk)     # [1, V]
            logits = last
            if n > 1:
                rest = self.model(input_ids=torch.tensor([whole[-n:-1]], device=dev), use_cache=True,
                                  **with_cache(self.model, cache)).logits[0]                        # [n-1, V]
                logits = torch.cat([last, rest], 0)
            logp = F.log_softmax(logits.float(), -1)                                                # [n, V]
            target = torch.tensor(whole[-n:], device=dev)
            self._held(cache)
            return float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            from tqdm import tqdm

            out = []
            for key, context_enc, continuation_enc in tqdm(requests, disable=disable_tqdm or self.rank != 0,
                                                           desc="kvtool loglikelihood"):
                answer = self._score(list(context_enc), list(continuation_enc))
                out.append(answer)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
            return out

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            from kvtool.cache import with_cache

            if context.shape[0] != 1:
                raise KvtoolError("KvtoolLM generates one sequence at a time (batch_size 1)")
            cache = self.kv_handle.fresh()
            out = super()._model_generate(context, max_length, stop, **generation_kwargs,
                                          **with_cache(self.model, cache))
            self._held(cache)
            return out

    try:
        from lm_eval.api.registry import register_model

        register_model("kvtool")(KvtoolLM)
    except (ImportError, ValueError, AssertionError):     # an lm-eval without the registry, or registered already
        pass
    return KvtoolLM
