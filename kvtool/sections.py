"""Names of the profile's tensor sections, in one place (the format is in docs/profile-format.md).

The runtime, calibration, inspect and the CLI ask here instead of spelling names out. The trace's copy score is
`heads.copy_score` (profiles made before the rename hold it as `heads.retrieval_score`, which `resolve` still reads);
the retrieval-head method writes its own `heads.retrieval.*` section, so the two no longer share a name.
"""

from __future__ import annotations

HEADS = "heads"
COPY_SCORE = "heads.copy_score"                    # trace: Retrieval-Head copy score [L, H_kv] (max over the group)
COPY_SCORE_Q = "heads.copy_score_q"                # the same per query head [L, H_kv, G]
STREAMING_MASS = "heads.streaming_mass"
SINK_MASS = "heads.sink_mass"
RECENT_MASS = "heads.recent_mass"
ENTROPY = "heads.entropy"
LAYER_SIMILARITY = "layers.similarity"             # [L-1, H_kv]: 1 - Jensen-Shannon of adjacent layers' attention

# old name → current name, for profiles written before a rename
LEGACY = {"heads.retrieval_score": COPY_SCORE, "heads.retrieval_score_q": COPY_SCORE_Q}


def heads_score(method: str) -> str:
    """A head method's continuous score [L, H_kv]."""
    return f"heads.{method}.score"


def heads_mask(method: str) -> str:
    """A head method's chosen retrieval mask [L, H_kv] (uint8)."""
    return f"heads.{method}.mask"


def heads_section(method: str) -> str:
    return f"heads.{method}"


def channels(kind: str, stat: str) -> str:
    """Traced per-channel statistic: kind key_pre | key_post | value; stat min | max | absmax | quantiles."""
    return f"channels.{kind}.{stat}"


def key_channels(rope: str, stat: str) -> str:
    return channels(f"key_{rope}", stat)


def quant_levels(kind: str, bits: int) -> str:
    """k-means codebook [L, H, 2^bits] from `kvtool calibrate --method kvquant`; kind key_pre | key_post | value."""
    return f"quant.{kind}.levels{bits}"


def pca(kind: str, stat: str) -> str:
    """Traced PCA of kind key_pre | key_post | value; stat mean | eigvals | basis."""
    return f"pca.{kind}.{stat}"


def resolve(profile, name: str) -> str | None:
    """A name `profile[...]` answers for section `name` (a Profile also answers to a renamed section's other name);
    the retrieval method's score falls back to the trace's copy score (a traced profile that was never calibrated
    with --method retrieval). None when absent."""
    if name in profile:
        return name
    if name == heads_score("retrieval") and COPY_SCORE in profile:
        return COPY_SCORE
    return None
