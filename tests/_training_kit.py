"""Helpers of the training tests: tiny shards (built once per test process), a tiny model
override, probe callbacks, and the argument list of a tiny ``mmlm fit`` run."""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent

# a smaller-than-tiny model: 32 px images, 16 patches -> 4 image tokens, a 1-layer 64-wide LM
TINY_OVERRIDES = {
    "vision": {"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "num_heads": 2},
    "projector": {"pixel_shuffle_factor": 2},
    "text": {"hf_config": {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                           "num_key_value_heads": 2, "intermediate_size": 128}},
}

MASKING_TEMPLATE = (  # a broken template: the assistant's text sits outside the generation marks
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '<|user|>' + message['content'] + '<|end|>\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '<|assistant|>' + message['content'] + '<|end|>' }}"
    "{% generation %}{% endgeneration %}{{ '\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)

_SHARDS: Path | None = None


def shards() -> Path:
    """Synthetic shards (48 train images in 3 shards, 4 val images with their questions), built
    once per test process."""
    global _SHARDS
    if _SHARDS is None:
        from data_pipelines.synthetic import build

        root = Path(tempfile.mkdtemp(prefix="mmlm-train-shards-"))
        atexit.register(shutil.rmtree, root, True)
        build(root / "synthetic", train=48, val=4, test=0, shard_size=16, workers=1, show_progress=False)
        _SHARDS = root / "synthetic"
    return _SHARDS


def tiny_model_args(**extra) -> dict:
    """VLMModule arguments of a smaller-than-tiny from-scratch model."""
    args = {"preset": "tiny", "model_overrides": TINY_OVERRIDES, "tokenizer_vocab_size": 320, "max_length": 160,
            "lr": 3e-3, "warmup": 0.0}
    args.update(extra)
    return args


# ---------------------------------------------------------------------------------- probe callbacks
class KillAt(pl.Callback):
    """Sends SIGTERM to this process after global step ``step`` (rank ``rank`` only)."""

    def __init__(self, step: int = 3, rank: int = 0):
        self.step, self.rank = step, rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), signal.SIGTERM)


class RngProbe(pl.Callback):
    """Logs a draw of the global torch RNG after every batch (resume must reproduce it)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pl_module.log("probe/rng", float(torch.rand(())), on_step=True, batch_size=1)


class SampleRecorder(pl.Callback):
    """Writes, per rank, the keys of the training samples (in order, per step), the keys of the
    first validation pass, and a hash of the final weights to ``RUN_DIR/probe-rank{R}.json``."""

    def __init__(self):
        self.train: list[list[str]] = []
        self.val: list[str] = []
        self.val_passes = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train.append(list(batch["keys"]))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking and self.val_passes == 0:
            self.val += list(batch["keys"])

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.val_passes += 1

    def on_fit_end(self, trainer, pl_module):
        h = hashlib.sha1()
        for name, t in sorted(pl_module.vlm.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().float().numpy().tobytes())
        path = Path(trainer.default_root_dir) / f"probe-rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"train": self.train, "val": self.val, "weights": h.hexdigest(),
                                    "step": trainer.global_step}))


def fit_args(run_dir: Path, *extra: str, steps: int = 4, workers: int = 0, batch_size: int = 4) -> list[str]:
    """``mmlm fit`` arguments of a tiny run on :func:`shards` (configs/tiny-cpu.yaml, shrunk)."""
    d = shards()
    return [
        "--config", str(REPO / "configs" / "tiny-cpu.yaml"),
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "2",
        "--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false",
        "--model.model_overrides", "null", "--model.model_overrides", json.dumps(TINY_OVERRIDES),  # not the recipe's
        "--model.tokenizer_vocab_size", "320", "--model.max_length", "160",
        "--data.train", str(d / "train"), "--data.val", str(d / "val"),
        "--data.batch_size", str(batch_size), "--data.num_workers", str(workers), "--data.shuffle_buffer", "16",
        "--data.sample_mode", "mixed",  # every record trains (the recipe's stage 1 reads captions only)
        "--data.min_samples", "1000",
        "--checkpoint.every_n_train_steps", "2",
        *extra,
    ]


def read_metrics(run_dir: Path) -> dict[str, dict[int, float]]:
    """``{metric: {step: value}}`` over the run's CSV log versions (later versions win)."""
    import csv

    out: dict[str, dict[int, float]] = {}
    for f in sorted(Path(run_dir).glob("logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:])):
        for row in csv.DictReader(open(f)):
            for k, v in row.items():
                if k not in ("step", "epoch") and v not in ("", None):
                    out.setdefault(k, {})[int(row["step"])] = float(v)
    return out
