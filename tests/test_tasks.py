"""The evaluation tasks of kvtool.tasks (copy, lookup, passkey-chat, nll-repeat): exact lengths, the answer where
the task says it is, seeds, scoring, and `kvtool run/bench --task` on a tiny model with per-sample hits."""

from __future__ import annotations

import json

import pytest
import torch

from kvtool import tasks
from kvtool.errors import KvtoolError
from kvtool.models import load_model


@pytest.fixture(scope="module")
def tok():
    return load_model()[1]


def _find(seq: list[int], sub: list[int]) -> list[int]:
    return [i for i in range(len(seq) - len(sub) + 1) if seq[i:i + len(sub)] == sub]


@pytest.mark.parametrize("name", ["copy", "copy-digits", "lookup", "passkey-chat"])
def test_generation_prompts_have_their_length_and_hold_the_answer(tok, name):
    data = tasks.samples(name, tok, [160, 300], [0.2, 0.8], seed=3)
    assert len(data) == 4
    for (prompt, answer_ids, answer), length in zip(data, [160, 160, 300, 300]):
        ids = prompt.tolist()
        assert len(ids) == length
        assert answer and answer_ids
        assert answer in tok.decode(ids)                          # the answer stands in the context ...
        assert not tok.decode(ids).endswith(answer)               # ... not at its end


def test_copy_prompt_ends_with_the_cue_and_the_span_stands_once_at_its_depth(tok):
    (p1, a1, _), (p2, a2, _) = tasks.copy_samples(tok, [400], [0.1, 0.9], seed=5, span=8, cue=3)
    for p, a in ((p1, a1), (p2, a2)):
        ids = p.tolist()
        assert len(a) == 5
        cue = ids[-3:]
        where = _find(ids, cue + a)
        assert len(where) == 1                                    # the whole span once, earlier in the context
        assert len(_find(ids, cue)) == 2                          # the cue: there and at the end
    first = _find(p1.tolist(), p1.tolist()[-3:])[0]
    second = _find(p2.tolist(), p2.tolist()[-3:])[0]
    assert first < 0.3 * 400 < 0.7 * 400 < second                # depth 0.1 vs 0.9


def test_copy_digits_line_stands_once_and_the_prompt_ends_with_its_first_groups(tok):
    data = tasks.copy_digits_samples(tok, [300, 300], [0.2, 0.8], seed=7, groups=4, cue=2)
    lines = []
    for (prompt, answer_ids, answer), depth in zip(data, [0.2, 0.8, 0.2, 0.8]):
        ids, text = prompt.tolist(), tok.decode(prompt)
        assert len(ids) == 300
        head, cue = text.rsplit("\n", 1)
        groups = cue.split(" ")
        assert len(groups) == 2 and all(len(g) == 4 and g.isdigit() for g in groups)
        assert len(answer) == 10 and answer[0] == " " and answer[1:5].isdigit() and answer[6:].isdigit()
        assert tok.decode(answer_ids) == answer
        line = cue + answer
        assert head.count(line) == 1 and f"\n{line}\n" in head       # the whole line once, on its own line
        assert len(_find(ids, answer_ids)) == 1                         # the answer's ids only there
        lines.append(line)
        at = head.index(line) / len(head)
        assert abs(at - depth) < 0.15
    assert len(set(lines)) == len(lines)                              # every sample draws its own digits


def test_lookup_has_every_key_once_and_asks_for_one(tok):
    (prompt, answer_ids, value), = tasks.lookup_samples(tok, [600], [0.5], seed=1, keys=6)
    text = tok.decode(prompt)
    lines = [line for line in text.split("\n") if line.count(": ") == 1 and line.split(": ")[1].isdigit()]
    assert len(lines) == 6 and len({line.split(": ")[0] for line in lines}) == 6
    key = next(line.split(": ")[0] for line in lines if line.split(": ")[1] == value)
    assert text.rstrip().endswith(f"The value of {key} is") and f"What is the value of {key}?" in text


def test_passkey_chat_uses_the_template(tok):
    (prompt, _, key), = tasks.chat_passkey_samples(tok, [500], [0.5], seed=2)
    text = tok.decode(prompt)
    assert text.count(key) == 2 and text.endswith("assistant\nThe pass key is")
    assert text.startswith(tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)[:20])


def test_passkey_chat_question_is_held_back_whole(tok):
    """--query after on passkey-chat: the context ends where the haystack ends; the question (the user's question,
    the end of the turn and the assistant's "The pass key is") is the prompt's tail, the same for every sample."""
    from kvtool.evaluate import split_question

    q = tasks.chat_passkey_question(tok)
    for prompt, _, key in tasks.chat_passkey_samples(tok, [300, 500], [0.3], seed=4):
        context, question = split_question(tok, prompt, q)
        assert torch.equal(torch.cat([context, question]), prompt) and question.tolist() == q
        assert key in tok.decode(context) and "What is the pass key?" not in tok.decode(context)
        assert tok.decode(question).strip().startswith("What is the pass key?")
        assert tok.decode(question).endswith("assistant\nThe pass key is")
    assert tasks.question_ids("passkey-chat", tok, "inside") is None
    with pytest.raises(KvtoolError, match="not copy-digits"):
        tasks.question_ids("copy-digits", tok, "after")


def test_nll_repeat_scores_only_the_second_occurrence(tok):
    data = tasks.repeat_nll_samples(tok, [300, 500], [0.3], seed=4, span=40, cue=6)
    for (context, cont), length in zip(data, [300, 500]):
        c = context.tolist()
        assert len(c) + cont.numel() == length and cont.numel() == 34
        cue = c[-6:]
        assert len(_find(c, cue + cont.tolist())) == 1           # the passage stands once in the context
        assert _find(c, cue + cont.tolist())[0] < length * 0.5


def test_seeds_give_other_samples_and_the_same_seed_the_same(tok):
    for name in tasks.names():
        a = tasks.samples(name, tok, [300], [0.5], seed=0)[0]
        b = tasks.samples(name, tok, [300], [0.5], seed=0)[0]
        c = tasks.samples(name, tok, [300], [0.5], seed=100)[0]
        assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0]), name


def test_scoring_exact_vs_contains(tok):
    copy, lookup = tasks.get("copy"), tasks.get("lookup")
    assert tasks.correct(copy, [5, 6, 7, 1], [5, 6, 7], "x", tok)
    assert not tasks.correct(copy, [5, 6, 8, 7], [5, 6, 7], "x", tok)
    ids = tok(" 4821. Done", add_special_tokens=False)["input_ids"]
    assert tasks.correct(lookup, ids, [], "4821", tok) and not tasks.correct(lookup, ids, [], "4822", tok)


@pytest.mark.parametrize("call,needle", [
    (lambda t: tasks.samples("sort", t, [100], [0.5]), "unknown task 'sort'"),
    (lambda t: tasks.copy_samples(t, [100], [0.5], span=4, cue=4), "cue"),
    (lambda t: tasks.copy_samples(t, [12], [0.5]), "too short"),
    (lambda t: tasks.copy_digits_samples(t, [100], [0.5], groups=3, cue=3), "cue"),
    (lambda t: tasks.copy_digits_samples(t, [20], [0.5]), "too short"),
    (lambda t: tasks.lookup_samples(t, [100], [0.5], text="/no/such.txt"), "no such text source"),
])
def test_bad_task_input_is_one_error(tok, call, needle):
    with pytest.raises(KvtoolError, match=needle):
        call(tok)


def test_bench_and_run_take_the_new_tasks(capsys, tmp_path):
    from test_cli import _save_tiny, run

    model = _save_tiny(tmp_path, load_model()[1])
    code, out, err = run(capsys, "bench", model, "--task", "copy", "--lengths", "96", "--depths", "3",
                         "--policies", "heads=none,sink=4,recent=16", "--baselines", "none", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["cache"] for r in rows] == ["full", "heads=none,sink=4,recent=16"]
    assert all(r["task"] == "copy" and len(r["hits"]) == 3 and r["accuracy"].endswith("/3") for r in rows)
    pols = "select=snapkv++,budget=48,obs=8,kernel=7"
    rows = {}
    for query in ("inside", "after"):                       # passkey-chat with its question after the compression
        code, out, err = run(capsys, "bench", model, "--task", "passkey-chat", "--lengths", "160", "--depths", "2",
                             "--policies", pols, "--baselines", "none", "--query", query, "--json")
        assert code == 0, err
        rows[query] = json.loads(out)
        assert [r.get("query") for r in rows[query]] == [None if query == "inside" else "after"] * 2
    assert rows["inside"][0]["hits"] == rows["after"][0]["hits"]       # the full cache cannot tell them apart
    code, _, err = run(capsys, "bench", model, "--task", "copy-digits", "--query", "after")
    assert code != 0 and "--query after applies to --task passkey and passkey-chat" in err
    code, out, err = run(capsys, "run", model, "--policy", "heads=none,sink=4,recent=16", "--task", "nll-repeat",
                         "--lengths", "230", "--depths", "2", "--json")
    assert code == 0, err
    full, ours = json.loads(out)
    assert full["task"] == ours["task"] == "nll-repeat" and len(full["sample_nll"]) == 2 and ours["nll"] > 0
    assert ours["x_smaller_than_16bit"] > 2
    code, out, err = run(capsys, "bench", model, "--task", "lookup", "--text", "filler", "--lengths", "64000",
                         "--policies", "heads=all")
    assert code != 0 and "context" in err


def test_sweep_samples_for_takes_the_task_defaults(tok):
    """kvtool.sweep.samples_for (the Python API under bench): keyword defaults and the task's own text source."""
    from kvtool.evaluate import default_depths
    from kvtool.sweep import default_text, samples_for

    got = samples_for("copy-digits", tok, lengths=[200], depths=3)
    want = tasks.samples("copy-digits", tok, [200], default_depths(3), seed=0, text=default_text("copy-digits"))
    assert len(got) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(got, want))
    assert default_text("nll") == "pydoc" and default_text("lookup") == tasks.get("lookup").default_text
    with pytest.raises(KvtoolError, match="unknown task"):
        samples_for("sort", tok)
