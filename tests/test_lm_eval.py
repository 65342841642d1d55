"""kvtool.lm_eval.KvtoolLM (lm-eval's HFLM scoring and generating through a kvtool cache) on a tiny offline task.

lm-eval is optional: without it the wrapper is one line of error and the lm-eval tests are skipped (they ran with
`pip install "kvtool[eval]"`)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from conftest import needle_sample
from kvtool.errors import KvtoolError

HAVE_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
needs_lm_eval = pytest.mark.skipif(not HAVE_LM_EVAL, reason='lm-eval is not installed (pip install "kvtool[eval]")')
POLICY = "heads=none,sink=4,recent=8"          # every head keeps 4 sink + 8 recent tokens: long contexts lose tokens


@pytest.mark.skipif(HAVE_LM_EVAL, reason="lm-eval is installed")
def test_without_lm_eval_the_wrapper_is_one_line_of_error():
    import kvtool.lm_eval as wrapper                        # importing the module needs no lm-eval

    with pytest.raises(KvtoolError, match=r'pip install "kvtool\[eval\]"'):
        wrapper.KvtoolLM


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama with the embedded model's tokenizer (lm-eval needs a real tokenizer), and its profile."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvtool.api import profile_model
    from kvtool.models import load_model
    from kvtool.trace import TraceConfig

    tok = load_model()[1]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(6.0)
    prof = profile_model(model, [needle_sample(T=64)], config=TraceConfig(sink=4, recent=16, query_samples=8,
                                                                           window=8), data={"kind": "test"})
    return model, tok, prof


def _task_dir(tmp_path) -> str:
    """Three offline tasks over one local jsonl: multiple choice (loglikelihood), generation, rolling perplexity."""
    words = "the cache keeps keys and values of every token that came before the one now being read".split()
    docs = []
    for i in range(4):
        text = " ".join(words[(i + j) % len(words)] for j in range(40 + 10 * i))     # contexts of ~40-70 tokens
        docs.append({"q": text, "choices": [" keys", " values", " tokens"], "gold": i % 3, "a": "keys"})
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (tmp_path / "mc.yaml").write_text(
        "task: kvtool_tiny_mc\n" + common + "output_type: multiple_choice\ndoc_to_text: '{{q}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{gold}}'\nmetric_list:\n  - metric: acc\n")
    (tmp_path / "gen.yaml").write_text(
        "task: kvtool_tiny_gen\n" + common + "output_type: generate_until\ndoc_to_text: '{{q}}'\n"
        "doc_to_target: '{{a}}'\ngeneration_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    (tmp_path / "ppl.yaml").write_text(
        "task: kvtool_tiny_ppl\n" + common + "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{q}}'\nmetric_list:\n  - metric: word_perplexity\n")
    return str(tmp_path)


@needs_lm_eval
def test_kvtool_lm_scores_and_generates_through_the_cache(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    import lm_eval
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from kvtool.lm_eval import KvtoolLM

    model, tok, prof = tiny
    ref = HFLM(pretrained=model, tokenizer=tok, backend="causal", batch_size=1, device="cpu")
    full = KvtoolLM(pretrained=model, tokenizer=tok, profile=prof, policy="full", device="cpu")
    small = KvtoolLM(pretrained=model, tokenizer=tok, profile=prof, policy=POLICY, device="cpu")
    long_ctx = " ".join(["a cache holds keys"] * 15)
    reqs = [Instance("loglikelihood", {}, (ctx, cont), i)
            for i, (ctx, cont) in enumerate([("The cache", " keeps"), (long_ctx, " values and keys"),
                                             ("x", " y z")])]
    want, got_full, got_small = ref.loglikelihood(reqs), full.loglikelihood(reqs), small.loglikelihood(reqs)
    # the uncompressed cache through our path = lm-eval's own scoring of the same model
    for (a, ga), (b, gb) in zip(want, got_full):
        assert a == pytest.approx(b, abs=1e-3) and ga == gb
    # a short context fits sink + recent (nothing dropped); the long one loses tokens and scores differently
    assert got_small[0][0] == pytest.approx(want[0][0], abs=1e-3)
    assert abs(got_small[1][0] - want[1][0]) > 1e-3
    assert small.kv_stats["requests"] == 3 and small.kv_stats["kv_bytes"] < small.kv_stats["full16_bytes"]
    gen = [Instance("generate_until", {}, (long_ctx, {"until": ["\n"], "max_gen_toks": 5, "do_sample": False}), 0)]
    assert full.generate_until(gen) == ref.generate_until(gen)
    assert isinstance(small.generate_until(gen)[0], str) and small.kv_stats["requests"] == 4

    tasks = ["kvtool_tiny_mc", "kvtool_tiny_gen", "kvtool_tiny_ppl"]
    out = lm_eval.simple_evaluate(model=small, tasks=tasks, task_manager=TaskManager(include_path=_task_dir(tmp_path)),
                                  num_fewshot=0, bootstrap_iters=0)
    res = out["results"]
    assert 0.0 <= res["kvtool_tiny_mc"]["acc,none"] <= 1.0
    assert 0.0 <= res["kvtool_tiny_gen"]["exact_match,none"] <= 1.0
    assert res["kvtool_tiny_ppl"]["word_perplexity,none"] > 1.0


@needs_lm_eval
def test_kvtool_lm_refuses_batches_and_a_foreign_profile(tiny):
    from conftest import tiny_model
    from kvtool.lm_eval import KvtoolLM

    model, tok, prof = tiny
    with pytest.raises(KvtoolError, match="batch_size 1"):
        KvtoolLM(pretrained=model, tokenizer=tok, profile=prof, policy="full", batch_size=4, device="cpu")
    with pytest.raises(KvtoolError, match="another model"):
        KvtoolLM(pretrained=tiny_model("gqa"), tokenizer=tok, profile=prof, device="cpu")
    assert os.environ.get("HF_DATASETS_OFFLINE") != "0"
