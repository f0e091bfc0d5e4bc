"""Light-PEFT's machinery: foundation masks, adapter importance, the prune plan, physical surgery, the
estimate-then-prune schedule and the merged export. The method itself is ``leantune.methods.light_peft``.

    from leantune.prune import save_merged, load_merged
    export = save_merged(model, "out/merged", tokenizer)   # model carries a pruned light_peft method
    print(export.describe())                              # which kind of folder, and why
    model = load_merged("out/merged")
"""

from .export import MergedExport, load_merged, save_merged
from .plan import (
    PlanError,
    PrunePlan,
    kept_count,
    select_channels,
    select_heads,
    select_modules,
    select_ranks,
)
from .surgery import apply_foundation_plan, prune_ffn, prune_heads, slice_in, slice_out

__all__ = [
    "MergedExport",
    "PlanError",
    "PrunePlan",
    "apply_foundation_plan",
    "kept_count",
    "load_merged",
    "prune_ffn",
    "prune_heads",
    "save_merged",
    "select_channels",
    "select_heads",
    "select_modules",
    "select_ranks",
    "slice_in",
    "slice_out",
]
