"""What every head-classification method returns. The one way kvtool turns scores into a retrieval mask lives in
kvtool.select (shared with the runtime) and is re-exported here."""

from __future__ import annotations

from calibrate import Result
from kvtool.select import check_fraction, top_count, top_fraction  # noqa: F401  (re-exported)


class HeadsResult(Result):
    """A head method's output: tensors for `heads.<method>.*` (each [L, H_kv]) and its provenance.

    `score` is continuous (higher = needs the whole context more); `mask` is the chosen retrieval set (uint8, 1 =
    keep every token). `params` lands in kvtool.calibration["methods"][method]; `windows` are the sink/recent sizes
    the method used (training) and proposes (deployment), kept as separate fields. kvtool.api.calibrate sets the
    default policy's `heads` from the mask of a HeadsResult (and of no other Result).
    """
