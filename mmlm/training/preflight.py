"""Pre-flight check: read a few training batches before the first step and report what the run
is about to do, failing early on what would waste it.

The report (printed on rank 0 and written to ``RUN_DIR/preflight.json``):

- **labels**: the chat template is probed first (a caption and a question/answer conversation must
  leave the answer supervised), then the share of real tokens that carry a label (the loss covers
  them) and samples with no supervised token. FAILS when every label is masked: the chat template
  masks every label (or every sample was cut before its answer), so the model would learn nothing;
- **images**: images and image tokens per batch, checked against the model's tokens per image;
- **truncation**: samples that reach ``max_length`` (probably cut), plus the data module's
  skipped-sample counts. FAILS (before reading data) when ``max_length`` cannot hold one image's
  tokens: every sample with an image would overflow inside its image span;
- **padding**: the real-token fraction (non-padding share of the batch);
- **parameters**: trained and frozen, per component;
- **memory**: an estimate for the observed batch at the trainer's precision: weights + gradients +
  AdamW states (two per trained parameter) + autocast weight copies (mixed precision) +
  activations (per transformer layer ~ tokens x (9 hidden + 4 intermediate) values, or one hidden
  state per layer plus one layer with activation checkpointing; the vision encoder's blocks, timm's or
  a transformers tower's, only when it trains; each LoRA adapter with dropout keeps a dropped-out copy
  of its input and a mask) + logits (fp32 for the loss and its gradient; at the labelled positions only when the LM
  takes the labelled-loss path, else at every position). A rough guide, not a measurement;
  compared with the device's memory on GPUs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import torch

from mmlm.training.freeze import parameter_counts

GIB = 1024**3


class PreflightError(ValueError):
    """The pre-flight check found a run that cannot learn."""


@dataclass
class PreflightReport:
    batches: int = 0
    samples: int = 0
    real_tokens: int = 0
    total_tokens: int = 0
    label_tokens: int = 0
    samples_without_labels: int = 0
    images: int = 0
    image_tokens: int = 0
    image_tokens_expected: int = 0
    samples_at_max_length: int = 0
    max_length: int | None = None
    longest_sample: int = 0
    batch_shape: tuple[int, int] = (0, 0)
    images_per_batch_max: int = 0
    skipped: dict = field(default_factory=dict)
    parameters: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def label_coverage(self) -> float:
        return self.label_tokens / self.real_tokens if self.real_tokens else 0.0

    @property
    def real_token_fraction(self) -> float:
        return self.real_tokens / self.total_tokens if self.total_tokens else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["label_coverage"] = self.label_coverage
        d["real_token_fraction"] = self.real_token_fraction
        return d

    def format(self) -> str:
        p = self.parameters.get("total", {})
        lines = [
            f"pre-flight over {self.batches} batch(es), {self.samples} samples:",
            f"  labels       {self.label_tokens} supervised of {self.real_tokens} real tokens "
            f"({100 * self.label_coverage:.1f}%); {self.samples_without_labels} sample(s) without a supervised token",
            f"  images       {self.images} image(s), {self.image_tokens} image tokens "
            f"(expected {self.image_tokens_expected})",
            f"  truncation   {self.samples_at_max_length} sample(s) at max_length={self.max_length} "
            f"(longest {self.longest_sample}); skipped by the data module: {self.skipped or 0}",
            f"  padding      real-token fraction {100 * self.real_token_fraction:.1f}% "
            f"(batch {self.batch_shape[0]} x {self.batch_shape[1]})",
            f"  parameters   trained {_human(p.get('trainable', 0))}, frozen {_human(p.get('frozen', 0))} ("
            + ", ".join(f"{c} {_human(self.parameters[c]['trainable'])}/{_human(sum(self.parameters[c].values()))}"
                        for c in ("vision", "projector", "lm") if c in self.parameters) + ")",
        ]
        m = self.memory
        if m:
            lines.append(
                f"  memory       ~{_bytes(m['total'])} per device at {m['precision']} (estimate): weights "
                f"{_bytes(m['weights'])}, grads {_bytes(m['grads'])}, AdamW {_bytes(m['optimizer'])}, autocast copies "
                f"{_bytes(m['autocast'])}, activations {_bytes(m['activations'])}, logits {_bytes(m['logits'])}"
                + (f"; the device has {m['device_gib']:.1f} GiB" if m.get("device_gib") else "")
            )
        lines += [f"  warning: {w}" for w in self.warnings]
        lines += [f"  ERROR: {e}" for e in self.errors]
        return "\n".join(lines)


def _bytes(n: float) -> str:
    for unit, div in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def _human(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def _segments(batch: dict, pad_token_id: int | None = None) -> list[tuple[int, int, int]]:
    """``(row, start, end)`` of each sample: rows of a padded batch, or the packed samples
    delimited by ``position_ids`` restarting at 0 (a packed row's trailing padding restarts them
    too, once or more: with ``pad_token_id``, segments of padding alone up to the row's end are no sample)."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    pos = batch.get("position_ids")
    out = []
    for r in range(ids.shape[0]):
        if mask is None and pos is not None:
            starts = (pos[r] == 0).nonzero().flatten().tolist() or [0]
            bounds = starts + [ids.shape[1]]
            for s, e in zip(bounds[:-1], bounds[1:]):
                padding = pad_token_id is not None and bool((ids[r, s:] == pad_token_id).all())
                if s > 0 and padding:
                    continue  # the row's padding
                out.append((r, s, e))
        else:
            n = int(mask[r].sum()) if mask is not None else ids.shape[1]
            out.append((r, 0, n))
    return out


def analyse_batches(batches: Iterable[dict], *, image_token_id: int, num_image_tokens: int,
                    max_length: int | None, ignore_index: int = -100,
                    pad_token_id: int | None = None) -> PreflightReport:
    """Label, image, truncation and padding statistics of some training batches (``pad_token_id``:
    tells a packed row's trailing padding from a sample)."""
    rep = PreflightReport(max_length=max_length)
    for batch in batches:
        ids, labels = batch["input_ids"], batch["labels"]
        mask = batch.get("attention_mask")
        rep.batches += 1
        total = int(batch.get("total_tokens", ids.numel()))
        real = batch.get("real_tokens")
        if real is None:
            real = int(mask.sum()) if mask is not None else total
        rep.total_tokens += total
        rep.real_tokens += int(real)
        supervised = labels != ignore_index
        rep.label_tokens += int(supervised.sum())
        segments = _segments(batch, pad_token_id)
        rep.samples += len(segments)
        for r, s, e in segments:
            n = e - s
            rep.longest_sample = max(rep.longest_sample, n)
            if not bool(supervised[r, s:e].any()):
                rep.samples_without_labels += 1
            if max_length is not None and n >= max_length:
                rep.samples_at_max_length += 1
        n_img = int(batch["num_images"].sum()) if batch.get("num_images") is not None else 0
        if n_img == 0 and batch.get("pixel_values") is not None:
            n_img = int(batch["pixel_values"].shape[0])
        rep.images += n_img
        rep.images_per_batch_max = max(rep.images_per_batch_max, n_img)
        rep.image_tokens += int((ids == image_token_id).sum())
        rep.image_tokens_expected += n_img * num_image_tokens
        b, length = ids.shape
        rep.batch_shape = (max(rep.batch_shape[0], b), max(rep.batch_shape[1], length))
        if isinstance(batch.get("skipped"), dict):  # the skips since the worker's previous batch: summed
            for reason, n in batch["skipped"].items():
                rep.skipped[reason] = rep.skipped.get(reason, 0) + int(n)
    if rep.batches == 0:
        rep.errors.append("the training data yielded no batch")
        return rep
    if rep.label_tokens == 0:
        rep.errors.append(
            f"every label in the first {rep.batches} batch(es) is masked (-100): the chat template masks every label "
            "(or every sample is cut before its answer), so there is nothing to learn; mark the assistant's text with "
            "{% generation %}...{% endgeneration %} in the template and check max_length"
        )
    elif rep.samples_without_labels:
        rep.warnings.append(f"{rep.samples_without_labels} of {rep.samples} samples have no supervised token "
                            "(truncated before the answer?)")
    if rep.image_tokens != rep.image_tokens_expected:
        rep.errors.append(f"{rep.image_tokens} image tokens in the text but {rep.images} image(s) x "
                          f"{num_image_tokens} tokens = {rep.image_tokens_expected} expected")
    if rep.samples_at_max_length:
        rep.warnings.append(f"{rep.samples_at_max_length} of {rep.samples} samples reach max_length={max_length} "
                            "and are probably truncated")
    if rep.real_token_fraction and rep.real_token_fraction < 0.5:
        rep.warnings.append(f"only {100 * rep.real_token_fraction:.0f}% of the batch is real tokens: consider "
                            "packing (data.packing true)")
    return rep


def check_template(processor) -> list[str]:
    """Errors of the processor's chat template: it must leave the assistant's answer supervised.
    (Probes a caption and a question/answer conversation; no data needed. The probes are encoded
    without the processor's ``max_length``: a short ``max_length`` is not the template's fault.)"""
    import copy
    import dataclasses

    probes = [
        processor.caption_conversation("a small red star on the left"),
        [{"role": "user", "content": "what color is the star?"}, {"role": "assistant", "content": "red"}],
    ]
    processor = copy.copy(processor)
    processor.config = dataclasses.replace(processor.config, max_length=max(processor.config.max_length, 1 << 16))
    errors = []
    for conv in probes:
        try:
            enc = processor.encode(conv, [])
        except Exception as e:  # noqa: BLE001 - reported
            errors.append(f"the chat template cannot encode a conversation: {e}")
            break
        if enc is not None and not bool((enc["labels"] != -100).any()):
            errors.append("the chat template masks every label: no token of the assistant's answer is supervised, "
                          "so there is nothing to learn; mark the assistant's text with "
                          "{% generation %}...{% endgeneration %} in the template")
            break
    return errors


def check_max_length(pl_module, datamodule=None) -> list[str]:
    """Errors of the run's ``max_length`` (the data module's ``max_length``, else the processor's): it
    must hold one image's tokens, or every sample with an image overflows inside its image span."""
    vlm, processor = pl_module.vlm, pl_module.processor
    max_length = getattr(datamodule, "max_length", None) or processor.config.max_length
    need = int(vlm.num_image_tokens)
    if max_length is not None and int(max_length) <= need:
        return [f"max_length={max_length} cannot hold one image ({need} image tokens) and an answer: every sample "
                "with an image would be cut inside its image span; raise max_length (--model.max_length, "
                "--data.max_length)"]
    return []


# ---------------------------------------------------------------------------------- memory
_HALF = {"16-true", "bf16-true", "transformer-engine", "transformer-engine-float16"}


def _dims_lm(lm) -> dict:
    cfg = getattr(lm, "config", None)
    if cfg is None and hasattr(lm, "get_base_model"):
        cfg = lm.get_base_model().config
    get = lambda *names, default=0: next((int(getattr(cfg, n)) for n in names if getattr(cfg, n, None)), default)  # noqa: E731
    hidden = get("hidden_size", "n_embd", "d_model")
    return {
        "hidden": hidden,
        "layers": get("num_hidden_layers", "n_layer", "num_layers"),
        "intermediate": get("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
        "vocab": get("vocab_size"),
    }


def _vision_blocks(vision) -> list:
    """The transformer blocks of a vision encoder: timm's ``vit.blocks``, a transformers tower's
    ``tower.encoder.layers``, else the longest ``nn.ModuleList`` in it (an encoder registered by the user)."""
    vit, tower = getattr(vision, "vit", None), getattr(vision, "tower", None)
    if vit is not None and hasattr(vit, "blocks"):
        return list(vit.blocks)
    if tower is not None and hasattr(getattr(tower, "encoder", None), "layers"):
        return list(tower.encoder.layers)
    lists = [m for m in vision.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def _dims_vision(vision) -> dict:
    """Width, blocks, MLP width and tokens per image of a vision encoder (``layers`` 0: unknown layout)."""
    blocks = _vision_blocks(vision)
    width = int(getattr(vision, "embed_dim", 0))
    mlp = 4 * width
    block_mlp = getattr(blocks[0], "mlp", None) if blocks else None
    fc1 = getattr(block_mlp, "fc1", None)
    if isinstance(fc1, torch.nn.Linear):
        mlp = int(fc1.out_features)
    # values kept per MLP unit: fc1's output and the activation's; CLIP's quick_gelu (x * sigmoid(1.702 x)) keeps
    # two more (the scaled input and the sigmoid)
    act_fn = getattr(block_mlp, "activation_fn", None)
    mlp_values = 4 if type(act_fn).__name__ == "QuickGELUActivation" else 2
    tokens = int(getattr(vision, "_num_patches", getattr(vision, "num_patches", 0))) \
        + int(getattr(vision, "num_prefix_tokens", 0))
    return {"width": width, "layers": len(blocks), "mlp": mlp, "mlp_values": mlp_values, "tokens": tokens}


def _lora_dropout_features(lm) -> int:
    """Input features summed over the LM's LoRA-adapted layers whose adapter applies dropout: each such
    layer keeps its own dropped-out copy of its input (and the mask) for the backward pass."""
    total = 0
    for m in lm.modules():
        drops = getattr(m, "lora_dropout", None)
        if not isinstance(drops, torch.nn.ModuleDict) or not hasattr(m, "in_features"):
            continue
        active = getattr(m, "active_adapters", list(drops.keys()))
        if any(isinstance(drops[a], torch.nn.Dropout) and drops[a].p > 0 for a in active if a in drops):
            total += int(m.in_features)
    return total


def estimate_memory(vlm, *, batch_size: int, seq_len: int, num_images: int, precision: str = "32-true",
                    activation_checkpointing: bool = False, logit_tokens: int | None = None) -> dict:
    """Bytes (and GiB) a training step needs per device; see the module docstring for the model.
    ``logit_tokens``: positions whose logits are built (the labelled ones when the LM takes the
    labelled-loss path, ``mmlm.modeling.vlm.labelled_loss_parts``); None: every position."""
    precision = str(precision)
    counts = parameter_counts(vlm)
    p_total = counts["total"]["trainable"] + counts["total"]["frozen"]
    p_train = counts["total"]["trainable"]
    half_weights = precision in _HALF
    mixed = precision.endswith("-mixed")
    full = 8 if precision.startswith("64") else 4  # "64-true"/"64": float64 weights and activations
    pbytes = 2 if half_weights else full
    abytes = 2 if (half_weights or mixed) else full
    weights = p_total * pbytes
    grads = p_train * pbytes
    optimizer = 2 * p_train * pbytes
    autocast = p_total * 2 if mixed else 0
    lm = _dims_lm(vlm.lm)
    tokens = batch_size * seq_len
    per_layer = tokens * (9 * lm["hidden"] + 4 * lm["intermediate"])
    if activation_checkpointing:
        act_lm = tokens * lm["hidden"] * lm["layers"] + per_layer
    else:
        act_lm = per_layer * lm["layers"]
    act = act_lm * abytes
    lora_in = _lora_dropout_features(vlm.lm)  # dropped-out inputs (and bool masks) of the LoRA adapters
    if lora_in and lm["layers"]:
        lora_act = tokens * lora_in * (abytes + 1)
        act += lora_act // lm["layers"] if activation_checkpointing else lora_act
    vision_trains = any(p.requires_grad for p in vlm.vision.parameters())
    vision_unmodelled = False
    if vision_trains and num_images:
        v = _dims_vision(vlm.vision)
        vision_unmodelled = v["layers"] == 0
        v_tokens = num_images * v["tokens"]
        v_layer = v_tokens * (9 * v["width"] + v["mlp_values"] * v["mlp"])
        v_act = (v_tokens * v["width"] * v["layers"] + v_layer) if activation_checkpointing else v_layer * v["layers"]
        act += v_act * abytes
    logits = (tokens if logit_tokens is None else logit_tokens) * lm["vocab"] * (abytes + 8)
    total = weights + grads + optimizer + autocast + act + logits
    out = {"precision": precision, "weights": weights, "grads": grads, "optimizer": optimizer,
           "autocast": autocast, "activations": act, "logits": logits, "total": total,
           "vision_unmodelled": vision_unmodelled}  # a training vision encoder with no blocks found: 0 activations
    for key in ("weights", "grads", "optimizer", "autocast", "activations", "logits", "total"):
        out[f"{key}_gib"] = out[key] / GIB
    return out


# ---------------------------------------------------------------------------------- callback
def run_preflight(pl_module, batches: Sequence[dict], *, precision: str = "32-true",
                  skipped: dict | None = None) -> PreflightReport:
    """The report for ``pl_module`` (a built :class:`VLMModule`) on ``batches``."""
    vlm, processor = pl_module.vlm, pl_module.processor
    rep = analyse_batches(batches, image_token_id=vlm.config.image_token_id,
                          num_image_tokens=vlm.num_image_tokens, max_length=processor.config.max_length,
                          ignore_index=vlm.config.ignore_index, pad_token_id=processor.tokenizer.pad_token_id)
    template_errors = check_template(processor)
    if template_errors:
        rep.errors = template_errors + [e for e in rep.errors if "masks every label" not in e]
    if skipped:  # the data module's own count, when it kept one, covers the batches' too
        rep.skipped = dict(skipped)
    rep.parameters = parameter_counts(vlm)
    if rep.parameters["total"]["trainable"] == 0:
        rep.errors.append("no parameter trains: check the stage and LoRA settings")
    if rep.batches:
        from mmlm.modeling.vlm import labelled_loss_parts

        hp = getattr(pl_module, "hparams", {})
        labelled_only = labelled_loss_parts(vlm.lm) is not None  # training builds labelled logits only
        rep.memory = estimate_memory(
            vlm, batch_size=rep.batch_shape[0], seq_len=rep.batch_shape[1], num_images=rep.images_per_batch_max,
            precision=precision, activation_checkpointing=bool(hp.get("activation_checkpointing", False)),
            logit_tokens=-(-rep.label_tokens // rep.batches) if labelled_only else None,
        )
        if rep.memory["vision_unmodelled"]:
            rep.warnings.append("the memory estimate leaves out the vision encoder's activations (no transformer "
                                "blocks found in it)")
        if torch.cuda.is_available() and vlm.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(vlm.device)
            rep.memory["device_gib"] = total / GIB
            if rep.memory["total"] > 0.95 * total:
                rep.warnings.append(f"the estimate ({rep.memory['total_gib']:.1f} GiB) exceeds the device's "
                                    f"{total / GIB:.1f} GiB: lower data.batch_size (raise accumulate_grad_batches), "
                                    "enable activation_checkpointing or use bf16")
    return rep


class Preflight(pl.Callback):
    """Reads a few training batches before the first step; fails a run that cannot learn."""

    def __init__(self, num_batches: int = 2, strict: bool = True, report_file: str | None = "preflight.json"):
        """
        Args:
            num_batches: training batches to read (0 disables the check).
            strict: fail the run on errors (every label masked, image-token mismatch); else only report.
            report_file: JSON report written under the run directory (None: not written).
        """
        super().__init__()
        if num_batches < 0:
            raise ValueError(f"num_batches must be >= 0, got {num_batches}")
        self.num_batches = num_batches
        self.strict = strict
        self.report_file = report_file
        self.report: PreflightReport | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.num_batches == 0 or trainer.ckpt_path or trainer.global_step > 0 \
                or getattr(pl_module, "vlm", None) is None:
            return  # disabled, or resuming (checked when the run started)
        dm = trainer.datamodule
        errors = check_template(pl_module.processor) + check_max_length(pl_module, dm)
        if errors and self.strict:  # before reading data (a data module may drop such samples as bad)
            raise PreflightError("pre-flight check failed: " + "; ".join(errors))
        if dm is None:
            return  # only runs with a data module are checked
        loader = dm.train_dataloader()
        batches = []
        iterator = iter(loader)
        try:
            for _ in range(self.num_batches):
                try:
                    batches.append(next(iterator))
                except StopIteration:
                    break
        finally:
            del iterator
        skipped = None
        if hasattr(dm, "skipped_counts"):
            try:
                skipped = dm.skipped_counts()
            except Exception:  # noqa: BLE001 - report only
                skipped = None
        self.report = run_preflight(pl_module, batches, precision=str(trainer.precision), skipped=skipped)
        if trainer.is_global_zero:
            print(self.report.format(), flush=True)
            if self.report_file:
                path = Path(trainer.default_root_dir) / self.report_file
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(self.report.to_dict(), indent=2, default=str))
        if self.report.errors and self.strict:
            raise PreflightError("pre-flight check failed: " + "; ".join(self.report.errors))

