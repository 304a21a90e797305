"""Attention ops: the DESIGN §4 mask in column-interval form and its backends.

``mask`` builds ``lo, hi`` from sample layouts (and the dense oracle of tests);
``attention`` holds the backend contract and ``get_attention_backend``, the one place that
picks the reference, FlexAttention or the CUDA extension.
"""

from modus_mega.ops.attention import (
    AttentionBackend,
    AttentionBackendName,
    attention,
    check_qkv,
    choose_attention_backend,
    get_attention_backend,
)
from modus_mega.ops.mask import (
    Layout,
    SplitMode,
    cache_boundaries,
    check_lo_hi,
    check_query_rows,
    dense_mask_from_layout,
    dense_mask_from_lo_hi,
    independent_blocks,
    layout_num_tokens,
    lo_hi_for_layout,
    padding_lo_hi,
)

__all__ = [
    "AttentionBackend",
    "AttentionBackendName",
    "Layout",
    "SplitMode",
    "attention",
    "cache_boundaries",
    "check_lo_hi",
    "check_query_rows",
    "check_qkv",
    "choose_attention_backend",
    "dense_mask_from_layout",
    "dense_mask_from_lo_hi",
    "get_attention_backend",
    "independent_blocks",
    "layout_num_tokens",
    "lo_hi_for_layout",
    "padding_lo_hi",
]
