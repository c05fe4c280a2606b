"""The data side: shard specs, safe decoding, training targets, the streaming pipeline, collation, the DataModule.

Public names (see each module's docstring for its contract)::

    from mmlm.data import VLMDataModule, VLMStream, StreamConfig, PadCollate, PackCollate
    from mmlm.data import resolve_sources, decode_image, BadSample, DataErrorBudgetExceeded

Names are imported lazily (PEP 562), so ``import mmlm.data.schema`` from the shard builders does
not pull in Lightning. Importing this package touches no global state.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "mmlm.data.datamodule": ["VLMDataModule", "StreamLoader"],
    "mmlm.data.stream": ["VLMStream", "StreamConfig", "StreamContext", "Item", "detect_rank_world"],
    "mmlm.data.targets": ["SAMPLE_MODES", "record_to_conversation", "vqa_answer"],
    "mmlm.data.collate": ["PadCollate", "PackCollate", "MODEL_INPUTS", "model_inputs"],
    "mmlm.data.decode": ["decode_image", "to_rgb", "DEFAULT_MAX_PIXELS"],
    "mmlm.data.errors": ["BadSample", "DataErrorBudgetExceeded", "ErrorBudget", "budget_violation", "classify",
                         "REASONS"],
    "mmlm.data.sources": ["Source", "SourceSpec", "parse_sources", "resolve_sources", "check_url", "open_shard"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mmlm.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
