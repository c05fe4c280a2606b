"""Training: the LightningModule, optimizer groups and schedule, freeze policies, callbacks,
pre-flight checks and model building. ``mmlm fit`` (``mmlm.cli.fit``) wires them into LightningCLI.

    from mmlm.training import VLMModule
    module = VLMModule(preset="tiny", stage="full", lr=1e-3)   # the model is built in configure_model
    trainer.fit(module, datamodule=VLMDataModule(train="data/synthetic/train", ...))

Names load lazily (importing :mod:`mmlm.training` does not import Lightning).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "mmlm.training.module": ["VLMModule"],
    "mmlm.training.optim": ["param_groups", "build_optimizer", "build_scheduler", "warmup_cosine", "resolve_warmup"],
    "mmlm.training.freeze": ["STAGES", "apply_stage", "apply_lora", "configure_trainable", "merge_lora",
                             "parameter_counts", "frozen_modules", "enable_activation_checkpointing"],
    "mmlm.training.callbacks": ["TrainingMonitor", "SignalCheckpoint", "StepCheckpoint", "ExportModel",
                                "NonFiniteGuard", "NonFiniteLossError", "TrainingInterrupted", "export_model"],
    "mmlm.training.preflight": ["Preflight", "PreflightError", "PreflightReport", "run_preflight",
                                "analyse_batches", "check_template", "check_max_length", "estimate_memory"],
    "mmlm.training.compile": ["compile_blocks"],
    "mmlm.training.checks": ["check_normalization", "check_attention_trains_on", "hparam_changes"],
    "mmlm.training.build": ["build_model_and_processor", "build_from_checkpoint", "train_tokenizer",
                            "tokenizer_from_shards", "corpus_from_shards", "processor_files", "processor_from_files"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mmlm.training' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
