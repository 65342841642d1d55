"""The policy table: fields come from the stores, docs/runtime.md lists exactly the table, strings round-trip, and
profiles store their default policy as the canonical string (old profiles still read)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtool.errors import KvtoolError
from kvtool.policy import DOCS_END, DOCS_START, Policy, field_table_markdown, fields
from kvtool.stores import STORES

ROOT = Path(__file__).resolve().parents[1]


def test_docs_list_exactly_the_table():
    text = (ROOT / "docs" / "runtime.md").read_text()
    block = text[text.index(DOCS_START) + len(DOCS_START):text.index(DOCS_END)].strip()
    assert block == field_table_markdown(), "run `python -m kvtool.policy --write-docs` to regenerate docs/runtime.md's table"


def test_every_field_read_by_a_store_is_in_the_table():
    table = fields()
    assert list(table)[0] == "heads"
    for cls in STORES.values():
        assert set(cls.reads) <= set(table), cls.name
    owners = {o.strip() for f in table.values() for o in f.owner.split(",")}
    assert owners <= set(STORES) | {"layer"}


@pytest.mark.parametrize("text", ["heads=duo:0.5,k=4,v=4,krope=pre", "heads=all", "heads=random:0.25:3,sink=4,recent=16",
                                  "heads=none,kclip=0.99,outliers=on,codebook=kmeans,vgroup=16,dtype=fp32",
                                  "heads=razor:0.5,k=2,v=3,buffer=0"])
def test_canonical_string_round_trips_and_through_a_profile(text):
    p = Policy.parse(text)
    assert str(p) == text and Policy.parse(str(p)) == p
    assert Policy.from_profile(p.to_profile()) == p


def test_defaults_come_from_the_table():
    p = Policy()
    for f in fields().values():
        for attr, value in f.default.items():
            assert getattr(p, attr) == value
    assert str(p) == "heads=all" and Policy.parse("k=4bit").k == 4 and Policy.parse("k=4bit").quantized


def test_old_profile_policy_still_reads():
    old = {"heads": "duo:0.5", "sink": 64, "recent": 256, "k_bits": 4, "v_bits": 16}
    assert str(Policy.from_profile(old)) == "heads=duo:0.5,k=4"
    assert Policy.from_profile(None) == Policy()


def test_shipped_profile_policy_reads():
    import json

    from safetensors import safe_open

    with safe_open(str(ROOT / "profiles" / "smollm2-135m-instruct.kv.st"), "pt") as f:
        stored = json.loads(f.metadata()["kvtool.policy"])
    assert Policy.from_profile(stored).heads == "duo"


def test_policy_is_immutable_and_replace_checks_names():
    p = Policy.parse("k=4")
    with pytest.raises(AttributeError):
        p.k = 2
    assert p.replace(k=2).k == 2 and p.k == 4
    with pytest.raises(TypeError):
        p.replace(bogus=1)
    with pytest.raises(KvtoolError, match="unknown policy field 'bogus'"):
        Policy.parse("bogus=1")
