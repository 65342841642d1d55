"""Every `generate` strategy on a CompressedCache (tiny model): greedy, sampling, num_return_sequences, beam search,
assisted decoding, prompt-lookup decoding, multi-turn reuse of one cache, the text-generation pipeline.

References: the lossless policy (heads=all,dtype=model) must give DynamicCache's tokens exactly; a head-split policy
without quantization must give the tokens of the same strategy run without a cache under the masked oracle attention
(streaming heads see sink + recent keys: the duo student with 0/1 gates), so batch reordering and rollback are checked
exactly; a quantizing policy must run. Refusals are one KvtoolError line. Store-level: batch reordering and cropping
of every registered store against a store that never saw the dropped rows / tokens.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import DynamicCache

from calibrate.duo import _duo_attention, _DuoState
from conftest import VOCAB, needle_sample, tiny_model
from kvtool.api import profile_model
from kvtool.cache import CompressedCache, with_cache
from kvtool.errors import KvtoolError
from kvtool.stores import STORES, SharedKeys, SharedStore, Store
from kvtool.trace import Dims, TraceConfig
from test_stores import CASES, D, G, H, T

LOSSLESS = "heads=all,dtype=model"
SPLIT = "heads=random:0.5:1,sink=4,recent=16,dtype=model"          # streaming heads drop tokens, nothing quantized
QUANT = "heads=random:0.5:1,k=4,v=4,sink=4,recent=16,buffer=16"
NEW = 8


@pytest.fixture(scope="module")
def model():
    return tiny_model("gqa")


@pytest.fixture(scope="module")
def profile(model):
    prof = profile_model(model, [needle_sample(T=64)], config=TraceConfig(sink=4, recent=16, query_samples=8))
    model.set_attn_implementation("sdpa")
    return prof


def prompt(T_: int = 48, seed: int = 0) -> torch.Tensor:
    """[1, T] tokens with a planted repeat (prompt-lookup finds candidates in it)."""
    return needle_sample(T=T_, seed=seed, needle_at=8).input_ids.view(1, -1)


def gen(model, ids, cache=None, seed=None, **kw):
    """model.generate with `cache` (None: DynamicCache), turning any deprecation warning into an error."""
    kw = {"max_new_tokens": NEW, "pad_token_id": 0, "attention_mask": torch.ones_like(ids), **kw}
    if isinstance(cache, CompressedCache):
        assert model.config._attn_implementation == "kvtool"              # the cache switched it
    else:
        model.set_attn_implementation("sdpa")                             # the reference runs plain sdpa
    if cache is not None:
        kw.update(with_cache(model, cache))
    if seed is not None:
        torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        return model.generate(ids, **kw)


def oracle_gen(model, ids, cache: CompressedCache, seed=None, **kw):
    """The same strategy without a cache, every step over the whole sequence with streaming heads masked to sink +
    recent: what a head-split cache must reproduce."""
    state = _DuoState(cache.retrieval.float(), Dims.of(model), cache.policy.sink, cache.policy.recent, "student")
    state.mode = "student"
    with _duo_attention(model, state):
        if seed is not None:
            torch.manual_seed(seed)
        return model.generate(ids, max_new_tokens=NEW, pad_token_id=0, attention_mask=torch.ones_like(ids),
                              use_cache=False, **kw)


def check(model, profile, ids, seed=None, draft=None, **kw):
    """Lossless == DynamicCache, head split == the masked oracle, quantized runs; returns the quantized cache and
    its output. `draft`: keywords of a speculative strategy, whose greedy tokens are greedy decoding's (the oracle,
    which has no cache, runs plain greedy)."""
    draft = draft or {}
    ref = gen(model, ids, seed=seed, **kw, **draft)
    assert torch.equal(gen(model, ids, speculative(CompressedCache(model, None, LOSSLESS), draft), seed=seed, **kw,
                           **draft), ref)
    split = speculative(CompressedCache(model, None, SPLIT), draft)
    got = gen(model, ids, split, seed=seed, **kw, **draft)
    assert torch.equal(got, oracle_gen(model, ids, split, seed=seed, **kw))
    kw.update(draft)
    quant = speculative(CompressedCache(model, profile, QUANT), draft)
    out = gen(model, ids, quant, seed=seed, **kw)
    assert out.shape == ref.shape and torch.equal(out[:, :ids.shape[1]], ids.expand(out.shape[0], -1))
    assert quant.nbytes() < quant.full_nbytes(torch.float32)
    return quant, out


def speculative(cache: CompressedCache, kw: dict) -> CompressedCache:
    """transformers 5.0 does not tell the cache that a speculative generate starts (5.17 does): do it by hand there."""
    import transformers

    if kw and not hasattr(transformers.Cache, "activate_past_recording"):
        cache.activate_past_recording()
    return cache


def test_greedy(model, profile):
    check(model, profile, prompt(), do_sample=False)


def test_sampling(model, profile):
    check(model, profile, prompt(), seed=3, do_sample=True, top_k=8)


def test_num_return_sequences(model, profile):
    quant, out = check(model, profile, prompt(), seed=4, do_sample=True, num_return_sequences=3)
    assert out.shape[0] == 3 and quant.layers[0].held_batch == 3


def test_beam_search(model, profile):
    """Beam search reorders the cache's batch every step (reorder_cache): the head split equals the masked oracle's
    beams exactly, so every store reindexes its rows right."""
    quant, out = check(model, profile, prompt(), do_sample=False, num_beams=3, num_return_sequences=2)
    assert out.shape[0] == 2 and quant.layers[0].held_batch == 3


def test_assisted_decoding(model, profile):
    """A draft model proposes tokens; rejected ones are cropped from the cache (window stores keep what they would
    free until the crop). Greedy assisted decoding equals greedy decoding."""
    draft = tiny_model("gqa", seed=1, layers=1)
    draft.generation_config.num_assistant_tokens = 4
    check(model, profile, prompt(), do_sample=False, draft={"assistant_model": draft})
    split = speculative(CompressedCache(model, None, SPLIT), {"assistant_model": draft})
    out = gen(model, prompt(), split, do_sample=False, assistant_model=draft)
    windows = [s for layer in split.layers for s in layer.stores if s.name == "window"]
    assert windows and all(len(s) <= 4 + 16 for s in windows)          # the last crop trimmed the window
    gen(model, out, split, do_sample=False)                             # a plain turn after it: recording ends
    assert all(len(s) <= 4 + 16 and not s.record_past for s in windows)


def test_prompt_lookup_decoding(model, profile):
    check(model, profile, prompt(), do_sample=False, draft={"prompt_lookup_num_tokens": 3})


@pytest.mark.parametrize("strategy", [{"num_beams": 3}, {"prompt_lookup_num_tokens": 3}])
def test_sliding_window_layers(strategy):
    """A model with its own sliding-window layers (window 24, prompt 48): beam search and prompt-lookup decoding
    with the lossless policy give DynamicCache's beams / greedy tokens (its sliding layers keep their window,
    reordered and rolled back like the rest)."""
    sliding = tiny_model("sliding")
    sliding.generation_config.eos_token_id = 2                         # as Llama's config has (transformers 5.0's
    ids = prompt()                                                     # prompt lookup needs one)
    # greedy prompt lookup = greedy (transformers 5.0's DynamicCache cannot roll back a sliding layer past its window)
    ref = gen(sliding, ids, do_sample=False, **({} if "prompt_lookup_num_tokens" in strategy else strategy))
    cache = speculative(CompressedCache(sliding, None, LOSSLESS), strategy)
    assert torch.equal(gen(sliding, ids, cache, do_sample=False, **strategy), ref)
    assert {len(s) for layer in cache.layers if layer.is_sliding for s in layer.stores} == {23}


def test_multi_turn_reuse_of_one_cache(model, profile):
    """Turn 2 passes turn 1's output plus new tokens with the same cache: only the new tokens are run."""
    ids, more = prompt(40), torch.randint(2, VOCAB, (1, 12), generator=torch.Generator().manual_seed(5))

    def two_turns(cache_factory):
        cache = cache_factory()
        first = gen(model, ids, cache, do_sample=False)
        second = gen(model, torch.cat([first, more], 1), cache, do_sample=False)
        return first, second, cache

    dyn = two_turns(lambda: DynamicCache(config=model.config))
    loss = two_turns(lambda: CompressedCache(model, None, LOSSLESS))
    assert torch.equal(loss[0], dyn[0]) and torch.equal(loss[1], dyn[1])
    first, second, split = two_turns(lambda: CompressedCache(model, None, SPLIT))
    assert torch.equal(second, oracle_gen(model, torch.cat([first, more], 1), split, do_sample=False))
    assert split.get_seq_length() == second.shape[1] - 1
    quant = two_turns(lambda: CompressedCache(model, profile, QUANT))[2]
    assert quant.get_seq_length() == second.shape[1] - 1
    # another batch on a filled cache, or a model switched away from the kvtool attention: one line each
    with pytest.raises(KvtoolError, match="holds 1 sequence"):
        gen(model, torch.cat([second, more], 1), quant, do_sample=True, num_return_sequences=2)
    model.set_attn_implementation("sdpa")
    with pytest.raises(KvtoolError, match="switched after the cache was built"):
        model.generate(torch.cat([second, more], 1), max_new_tokens=2, **with_cache(model, quant))


def test_batch_repeat_on_a_filled_cache(model, profile):
    """num_return_sequences on a cached prompt: batch_repeat_interleave(n) repeats the held rows first."""
    ids, more = prompt(40), torch.randint(2, VOCAB, (1, 6), generator=torch.Generator().manual_seed(6))
    outs = []
    for make in (lambda: DynamicCache(config=model.config), lambda: CompressedCache(model, None, LOSSLESS),
                 lambda: CompressedCache(model, profile, QUANT)):
        cache = make()
        first = gen(model, ids, cache, do_sample=False)
        cache.batch_repeat_interleave(2)
        outs.append(gen(model, torch.cat([first, more], 1).repeat(2, 1), cache, seed=7, do_sample=True))
    assert torch.equal(outs[1], outs[0]) and outs[2].shape == outs[0].shape == (2, 40 + NEW + 6 + NEW)
    assert outs[0][0].tolist() != outs[0][1].tolist()                    # two samples, not one row twice


def test_text_generation_pipeline(model, profile):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, pipeline

    words = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(VOCAB)}, unk_token="<0>"))   # one word a token
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<0>", pad_token="<0>", eos_token="<1>")
    pipe = pipeline("text-generation", model=model, tokenizer=tok, device="cpu")
    text = " ".join(f"<{int(i)}>" for i in prompt()[0])
    assert tok(text).input_ids == prompt()[0].tolist()
    model.set_attn_implementation("sdpa")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        ref = pipe(text, max_new_tokens=NEW, do_sample=False)[0]["generated_text"]
        lossless = CompressedCache(model, None, LOSSLESS)
        assert pipe(text, max_new_tokens=NEW, do_sample=False, **with_cache(model, lossless))[0]["generated_text"] == ref
        quant = CompressedCache(model, profile, QUANT)
        got = pipe(text, max_new_tokens=NEW, do_sample=False, **with_cache(model, quant))[0]["generated_text"]
    assert got.startswith(text) and quant.get_seq_length() == prompt().shape[1] + NEW - 1


def test_refusals_are_one_line(model, profile):
    """A crop that needs tokens a store has freed or compressed is refused before anything changes."""
    ids = prompt(60)
    win = CompressedCache(model, None, "heads=none,sink=4,recent=16")   # no past recording: evicted tokens are gone
    gen(model, ids, win, max_new_tokens=1)
    held = [len(s) for layer in win.layers for s in layer.stores]
    with pytest.raises(KvtoolError, match=r"cannot drop 3 token\(s\) from the cache \(layer 0\): the window store "
                                          r"would need token 41 back") as e:
        win.crop(-3)
    assert "\n" not in str(e.value) and [len(s) for layer in win.layers for s in layer.stores] == held
    pod = CompressedCache(model, None, LOSSLESS)                          # a PoD store cannot roll back at all
    pod.layers[1].groups[0].store = SharedStore(SharedKeys(1, torch.arange(2), 4, torch.float32), True, 4, 16,
                                                torch.float32)
    with pytest.raises(KvtoolError, match="assisted and prompt-lookup decoding are not supported by this cache: "
                                          "policy pod"):
        pod.activate_past_recording()
    quant = CompressedCache(model, profile, "heads=all,k=4,v=4,sink=4,buffer=0")
    gen(model, ids, quant, max_new_tokens=1)                              # 60 tokens: 4 sink, 56 quantized
    with pytest.raises(KvtoolError, match="drop 1 tokens but only its last 0 are still 16-bit"):
        quant.crop(-1)


# ---- store level: every registered store -------------------------------------------------------------------------

def _two_rows():
    g = torch.Generator().manual_seed(11)
    k = torch.randn(2, H, T, D, generator=g) * 1.5
    v = torch.randn(2, H, T, D, generator=g)
    q = torch.randn(2, H * G, 1, D, generator=g)
    return q, k, v


def _feed(store, k, v, chunks, start=0):
    pos = start
    for n in chunks:
        store.append(k[:, :, pos:pos + n], v[:, :, pos:pos + n], torch.arange(pos, pos + n))
        pos += n


@pytest.mark.parametrize("name", sorted(CASES))
def test_store_select_batch(name):
    """Rows [1, 0, 1] of a store = the stores of those rows: attention of each row's query is unchanged."""
    q, k, v = _two_rows()
    case = CASES[name]
    store = case.make(k)
    _feed(store, k, v, [11, 20, 1, 1, 12])
    qpos = torch.tensor([T])
    before = store.attend(q, qpos, 0.25)[0]
    idx = torch.tensor([1, 0, 1])
    store.select_batch(idx)
    after = store.attend(q[idx], qpos, 0.25)[0]
    torch.testing.assert_close(after, before[idx], atol=1e-6, rtol=0)


def test_every_registered_store_reorders_its_batch():
    assert {c.store for c in CASES.values()} == set(STORES)
    for name, cls in STORES.items():
        assert cls.select_batch is not Store.select_batch, f"store {name} has no select_batch"


@pytest.mark.parametrize("name", sorted(CASES))
def test_store_crop(name):
    """Dropping the last 3 tokens leaves the store holding exactly what it held of the others (recording the past
    for window-like stores); a store that cannot roll back says why."""
    q, k, v = _two_rows()
    store = CASES[name].make(k)
    if store.rollback_refusal() is not None:
        _feed(store, k, v, [30])
        assert "cannot drop" in store.crop_refusal(27)
        with pytest.raises(KvtoolError):
            store.crop(27)
        return
    store.record_past = True
    _feed(store, k, v, [30, 4])
    full = store.read() if hasattr(store, "read") else None
    reason = store.crop_refusal(31)
    assert reason is None, reason
    store.crop(31)
    store.record_past = False
    assert store.seen == 31
    if full is not None:                 # sink | body | buffer: the same contents, less the last 3 tokens
        for got, want in zip(store.read(), full):
            assert torch.equal(got, want[..., :got.shape[-2], :] if got.dim() == 4 else want[:len(got)])
        assert len(store) == len(full[2]) - 3          # every held token but the last 3 (31 - first, or a window)
        return
    ref = CASES[name].make(k)            # window-like: what a store that saw 31 tokens holds
    _feed(ref, k, v, [30, 1])
    assert len(store) == len(ref) and [t.shape for t in store.tensors()] == [t.shape for t in ref.tensors()]
    for a, b in zip(store.tensors(), ref.tensors()):
        assert torch.equal(a, b)
    qpos = torch.tensor([31])
    torch.testing.assert_close(store.attend(q, qpos, 0.25)[0], ref.attend(q, qpos, 0.25)[0], atol=1e-6, rtol=0)


def test_our_calls_pass_the_cache_keyword_transformers_expects(model, profile):
    """kvtool's own calls (prefill, the run tasks' forward passes, generate through with_cache) raise no deprecation
    warning of the installed transformers: `cache=` where it renamed `past_key_values=`, the old name before."""
    import inspect

    from kvtool.cache import prefill
    from kvtool.evaluate import run_nll

    name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    assert list(with_cache(model, None)) == [name]
    ids = prompt()
    samples = [(ids[0, :40], ids[0, 40:])]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        for cache in (DynamicCache(config=model.config), CompressedCache(model, profile, QUANT)):
            prefill(model, ids, cache, chunk=16)
        for spec in ("full", QUANT):
            assert run_nll(model, samples, spec, profile, chunk=16, decode_steps=2).nll > 0
