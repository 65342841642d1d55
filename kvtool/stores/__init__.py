"""The runtime's stores, one per file, and their registry (`STORES`). See kvtool/stores/base.py for the interface.

    window     sink + recent tokens in 16 bits (StreamingLLM)                 kvtool/stores/window.py
    quantized  16-bit sink | quantized body | 16-bit buffer (KIVI, KVQuant)   kvtool/stores/quantized.py
    sliding    a model's own sliding-window layer                            kvtool/stores/sliding.py
    lowrank    16-bit sink | PCA latent body | 16-bit buffer (Palu, Eigen)     kvtool/stores/lowrank.py
    shared     distant keys shared by a PoD layer group (PoD, MiniCache)      kvtool/stores/shared.py
    qwindow    sink + recent window with its older tokens quantized          kvtool/stores/qwindow.py
    snapkv     prompt tokens chosen by the last queries (SnapKV / SnapKV++),  kvtool/stores/snapkv.py
               optional sparse page reads at decode (RocketKV stage 2)       kvtool/stores/tokens.py
    h2o        heavy hitters by accumulated attention + recent (H2O)          kvtool/stores/h2o.py

Importing this package registers every store's policy fields (kvtool.policy table), in canonical order: the layer's
`heads` first, then each store's fields, then the layer's `dtype`.
"""

from kvtool.policy import DTYPE, HEADS, register_field

register_field(HEADS)

from kvtool.stores.base import STORES, Store, merge, partial, register, storage_dtype  # noqa: E402
from kvtool.stores.window import WindowStore  # noqa: E402
from kvtool.stores.quantized import QuantizedStore  # noqa: E402
from kvtool.stores.sliding import SlidingStore  # noqa: E402
from kvtool.stores.lowrank import LowRankStore  # noqa: E402
from kvtool.stores.shared import SharedKeys, SharedStore  # noqa: E402
from kvtool.stores.qwindow import QuantizedWindowStore  # noqa: E402
from kvtool.stores.snapkv import SnapKVStore  # noqa: E402
from kvtool.stores.h2o import H2OStore  # noqa: E402

register_field(DTYPE)

__all__ = ["STORES", "Store", "merge", "partial", "register", "storage_dtype", "WindowStore", "QuantizedStore",
           "SlidingStore", "LowRankStore", "SharedKeys", "SharedStore", "QuantizedWindowStore", "SnapKVStore", "H2OStore"]
