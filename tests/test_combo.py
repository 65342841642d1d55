"""The combo method: rank averaging of head signals a profile holds (no model run)."""

from __future__ import annotations

import pytest
import torch

from calibrate.combo import Combo, ranks
from kvtool.errors import KvtoolError


class _Profile(dict):
    pass


def test_ranks_are_normalised_and_share_ties():
    r = ranks(torch.tensor([[0.3, 0.1], [0.3, 0.9]]))
    assert torch.allclose(r, torch.tensor([[0.5, 0.0], [0.5, 1.0]]))


def test_mean_rank_picks_heads_every_signal_likes_over_one_signal_s_favourite():
    # head (0,0): first by duo only; head (1,1): second by both signals -> best mean rank
    prof = _Profile({"heads.duo.gate": torch.tensor([[1.0, 0.2], [0.1, 0.9]]),
                     "heads.copy_score": torch.tensor([[0.0, 0.1], [0.2, 0.8]]),
                     "heads.streaming_mass": torch.tensor([[0.9, 0.5], [0.4, 0.3]])})
    res = Combo(signals="duo,copy").run(profile=prof, fraction=0.25)
    assert res.tensors["mask"].tolist() == [[0, 0], [0, 1]]
    assert res.params["rank_correlation_with_score"]["duo"] > 0
    res = Combo(signals="copy,distant").run(profile=prof, fraction=0.5)   # distant = 1 - streaming mass
    assert res.tensors["mask"].tolist() == [[0, 0], [1, 1]]
    assert torch.allclose(res.tensors["score"], (ranks(prof["heads.copy_score"])
                                                 + ranks(1 - prof["heads.streaming_mass"])) / 2)


@pytest.mark.parametrize("signals,needle", [("duo", "two or more"), ("duo,duo", "two or more"),
                                            ("duo,gate", "two or more")])
def test_bad_signals(signals, needle):
    with pytest.raises(KvtoolError, match=needle):
        Combo(signals=signals)


def test_missing_signal_is_named():
    with pytest.raises(KvtoolError, match="heads.razor.score"):
        Combo(signals="copy,razor").run(profile=_Profile({"heads.copy_score": torch.zeros(2, 2)}))


def test_pull_signal_reads_duo_s_pull_and_names_duo_when_missing():
    prof = _Profile({"heads.duo.pull": torch.tensor([[0.5, -0.1], [0.0, 2.0]]),
                     "heads.copy_score": torch.tensor([[0.7, 0.1], [0.2, 0.8]])})
    res = Combo(signals="pull,copy").run(profile=prof, fraction=0.25)
    assert res.tensors["mask"].tolist() == [[0, 0], [0, 1]]
    with pytest.raises(KvtoolError, match="heads.duo.pull.*--method duo"):
        Combo(signals="pull,copy").run(profile=_Profile({"heads.copy_score": torch.zeros(2, 2)}))
