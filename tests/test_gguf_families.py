"""`kvtool profile MODEL.gguf` for families other than the embedded Llama: each family's tiny random model
(tests/families.py) is written as a float32 `.gguf` in-process (tests/ggufwrite.py), `kvtool profile FILE.gguf`
traces it with the same progress and summary as for the model's directory, and the model kvtool loads from the file
gives the source model's logits (to 1e-5; 0 here) — the file really is that model.

Covered from GGUF: Llama (a tiny GQA one, beside the embedded model), Qwen 2, Qwen 3, Phi-3, Gemma 2, Gemma 3, GPT-2.

What a GGUF cannot carry (transformers.integrations.ggml maps no metadata key to it) is set, in the source model, to
the value the reader falls back on (GGUF_OVERRIDES): Qwen 3's head_dim (the config's default, 128), Gemma 2/3's
`query_pre_attn_scalar` (256), Gemma 2's attention soft-capping (50), Gemma 3's layer pattern (the default: five
sliding layers, then a full one — hence 6 layers), GPT-2's context (1024; the reader maps it to `n_ctx`).

Not covered: Mistral — llama.cpp stores it as `llama` named "mistral", and transformers (5.24) then asks gguf-py
for a "mistral" tensor-name map it does not have ("Unknown gguf model_type: mistral"), so no Mistral GGUF loads;
test_mistral_gguf_is_refused_in_one_line checks kvtool says so in one line. GPT-OSS: the tracer refuses it anyway
(tests/test_architectures.py), and its GGUF layout (stacked experts) is not written here.
"""

from __future__ import annotations

import json

import pytest
import torch

from families import family_model
from ggufwrite import vocab_size, write_gguf
from kvtool.models import load_model
from kvtool.profile import Profile, model_fingerprint
from test_architectures import _profile_cli
from test_cli import assert_one_line_error

# family -> config keywords set to what the GGUF reader falls back on (see the module docstring)
GGUF_OVERRIDES = {
    "llama": {},                                      # the embedded model's family, here with GQA and permuted q/k
    "qwen2": {},
    "qwen3": dict(head_dim=128),
    "phi3": {},
    "gemma2": dict(query_pre_attn_scalar=256, attn_logit_softcapping=50.0),
    "gemma3": dict(query_pre_attn_scalar=256, num_hidden_layers=6, layer_types=None),
    "gpt2": {},
}


def gguf_source(name: str):
    return family_model(name, vocab=vocab_size(), context=1024 if name == "gpt2" else 512, **GGUF_OVERRIDES[name])


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """The GGUF conversions go to this test's cache, not the user's."""
    monkeypatch.setenv("KVTOOL_CACHE", str(tmp_path / "cache"))


def _summary(capsys, model, target):
    capsys.readouterr()
    code = _profile_cli(model, target, "--json")
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert "Traceback" not in cap.err
    return json.loads(cap.out), cap.err


@pytest.mark.parametrize("name", list(GGUF_OVERRIDES))
def test_profile_of_a_family_gguf(capsys, tmp_path, name):
    """The family's tiny model written as a GGUF: kvtool loads it as that model (same class, same logits), and
    `kvtool profile FILE.gguf` gives the summary `kvtool profile DIR` gives for the same model."""
    source = gguf_source(name)
    path = write_gguf(name, source, tmp_path / f"tiny-{name}.gguf")

    # the file is the model: kvtool's loader (through its conversion cache) gives the source's logits
    model, tok = load_model(str(path))
    assert type(model) is type(source)
    ids = torch.randint(3, len(tok), (1, 60), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, source(ids).logits, atol=1e-5, rtol=1e-5)

    # `kvtool profile FILE.gguf --json`: the progress, and the same summary as `kvtool profile DIR` of the source
    # model saved with the GGUF's tokenizer (the table form: test_profile_of_a_gguf_prints_the_table)
    got, err = _summary(capsys, path, tmp_path / "g.kv.st")
    assert "Traced 2 samples of 160 tokens" in err
    source.save_pretrained(tmp_path / "dir")
    tok.save_pretrained(tmp_path / "dir")
    want, _ = _summary(capsys, tmp_path / "dir", tmp_path / "d.kv.st")
    assert got.pop("model") == str(path) and want.pop("model") == str(tmp_path / "dir")
    assert got.pop("output") == str(tmp_path / "g.kv.st") and want.pop("output") == str(tmp_path / "d.kv.st")
    assert abs(got.pop("bytes") - want.pop("bytes")) < 64                     # the file records the model's name
    # the fingerprint hashes the config, which the GGUF reader rebuilds (eps read back as float32, the tokenizer's
    # bos/eos/pad ids): it is the loaded model's, as Profile.load below checks
    assert got.pop("fingerprint") == model_fingerprint(model) != want.pop("fingerprint")
    assert got.keys() == want.keys()
    for key in [k for k in got if not k.endswith("seconds")]:                 # timings differ
        if isinstance(got[key], float):
            assert got[key] == pytest.approx(want[key], abs=2e-4), key           # printed to 4 decimals
        else:
            assert got[key] == want[key], key
    layers = source.config.num_hidden_layers
    assert got["samples"] == 2 and got["kv_heads"] == layers * getattr(source.config, "num_key_value_heads",
                                                                        source.config.num_attention_heads)
    prof = Profile.load(tmp_path / "g.kv.st", model=model)                      # the fingerprint is the model's
    assert prof["heads.sink_mass"].shape[0] == layers


def test_profile_of_a_gguf_prints_the_table(capsys, tmp_path):
    """Without --json: the summary table and the closing line, as for a directory (one family: the code after the
    load is the same for all)."""
    path = write_gguf("gemma2", gguf_source("gemma2"), tmp_path / "tiny-gemma2.gguf")
    capsys.readouterr()
    code = _profile_cli(path, tmp_path / "t.kv.st")
    cap = capsys.readouterr()
    assert code == 0 and "kvtool profile" in cap.out and "mean_streaming_mass" in cap.out, cap.err
    assert "Traced 2 samples of 160 tokens" in cap.err and "Traceback" not in cap.err
    assert Profile.load(tmp_path / "t.kv.st")["heads.sink_mass"].shape == (3, 2)


def test_mistral_gguf_is_refused_in_one_line(capsys, tmp_path):
    """transformers cannot load a Mistral GGUF (no gguf-py name map for "mistral"): one line, no traceback."""
    source = family_model("mistral", vocab=vocab_size(), sliding_window=4096)
    path = write_gguf("mistral", source, tmp_path / "tiny-mistral.gguf")
    capsys.readouterr()
    code = _profile_cli(path, tmp_path / "m.kv.st")
    err = capsys.readouterr().err
    assert_one_line_error(code, err, "Unknown gguf model_type: mistral")
    assert not (tmp_path / "m.kv.st").exists()
