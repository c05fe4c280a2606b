"""Training library: optimizer groups, schedule, stages, model building, the LightningModule
(smoke run, frozen parameters, non-finite losses), pre-flight and memory estimate."""

from __future__ import annotations

import importlib.util
import math
import sys

import lightning.pytorch as pl
import pytest
import torch

from _tiny import image, tiny_pair
from _training_kit import MASKING_TEMPLATE, TINY_OVERRIDES, shards, tiny_model_args
from mmlm.training.build import (
    build_from_checkpoint,
    build_model_and_processor,
    processor_files,
    processor_from_files,
)
from mmlm.training.callbacks import ExportModel, NonFiniteGuard, NonFiniteLossError, TrainingMonitor
from mmlm.training.freeze import apply_lora, apply_stage, frozen_modules, parameter_counts
from mmlm.modeling.fusion import projected_cross_entropy
from mmlm.training.module import VLMModule
from mmlm.training.optim import build_optimizer, param_groups, resolve_warmup, warmup_cosine
from mmlm.training.preflight import Preflight, PreflightError, analyse_batches, estimate_memory, run_preflight


def datamodule(**kw):
    from mmlm.data import VLMDataModule

    args = dict(train=str(shards() / "train"), batch_size=4, num_workers=0, shuffle_buffer=16, min_samples=1000)
    args.update(kw)
    return VLMDataModule(**args)


def trainer(tmp_path, steps: int, callbacks=(), **kw) -> pl.Trainer:
    args = dict(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                default_root_dir=tmp_path, callbacks=list(callbacks))
    args.update(kw)
    return pl.Trainer(**args)


def built_module(**kw) -> VLMModule:
    module = VLMModule(**tiny_model_args(**kw))
    module.build(train_shards=[str(shards() / "train")])
    return module


# ---------------------------------------------------------------------------------- optimizer
def test_param_groups_split_lrs_and_weight_decay():
    vlm, _ = tiny_pair()
    groups = param_groups(vlm, lr=1e-3, vision_lr=1e-4, projector_lr=2e-3, weight_decay=0.1)
    by = {g["name"]: g for g in groups}
    assert by["vision.decay"]["lr"] == 1e-4 and by["vision.no_decay"]["lr"] == 1e-4
    assert by["projector.decay"]["lr"] == 2e-3 and by["lm.decay"]["lr"] == 1e-3
    assert all(g["weight_decay"] == (0.1 if g["name"].endswith(".decay") else 0.0) for g in groups)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len({id(p) for p in vlm.parameters()})  # every parameter once (tied once)
    assert id(vlm.lm.get_input_embeddings().weight) in no_decay
    for name, p in vlm.named_parameters():
        if name.endswith("bias") or "norm" in name.lower() or "pos_embed" in name or "cls_token" in name:
            assert id(p) in no_decay, name
        elif p.ndim >= 2 and "embed_tokens" not in name:
            assert id(p) not in no_decay, name
    apply_stage(vlm, "align")
    assert {g["component"] for g in param_groups(vlm, lr=1e-3)} == {"projector"}
    vlm.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(vlm, lr=1e-3)


def test_cpu_optimizer_is_fused_and_steps_like_torch_s_default_adamw():
    vlm, _ = tiny_pair()
    ref = {n: p.detach().clone() for n, p in vlm.named_parameters()}
    opt = build_optimizer(vlm, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98))
    assert opt.defaults["fused"] is True
    torch.manual_seed(0)
    grads = {n: torch.randn_like(p) for n, p in vlm.named_parameters()}
    # the same groups stepped by torch's default (foreach) AdamW on copies of the parameters
    copies = {n: torch.nn.Parameter(t.clone()) for n, t in ref.items()}
    by_id = {id(p): n for n, p in vlm.named_parameters()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [copies[by_id[id(p)]] for p in g["params"]]}
              for g in opt.param_groups]
    plain = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.98))
    assert not plain.defaults["fused"]
    for _ in range(3):
        for n, p in vlm.named_parameters():
            p.grad = grads[n].clone()
            copies[n].grad = grads[n].clone()
        opt.step()
        plain.step()
    for n, p in vlm.named_parameters():
        assert not torch.equal(p, ref[n]), n  # it trained
        torch.testing.assert_close(p.detach(), copies[n].detach(), rtol=1e-6, atol=1e-7, msg=n)
    assert build_optimizer(vlm, lr=1e-3, fused=False).defaults["fused"] in (None, False)


def test_warmup_cosine_schedule():
    fn = warmup_cosine(100, 10, min_lr_ratio=0.1)
    assert fn(0) == 0.0 and fn(5) == pytest.approx(0.5) and fn(10) == pytest.approx(1.0)
    assert fn(55) == pytest.approx(0.1 + 0.9 * 0.5)
    assert fn(100) == pytest.approx(0.1) and fn(1000) == pytest.approx(0.1)
    assert warmup_cosine(10, 0)(0) == 1.0
    assert resolve_warmup(0.03, 1000) == 30 and resolve_warmup(50, 1000) == 50
    with pytest.raises(ValueError):
        resolve_warmup(2.5, 100)


# ---------------------------------------------------------------------------------- stages
def test_stages_freeze_the_right_parts():
    vlm, _ = tiny_pair()
    for stage, trains in (("align", {"projector"}), ("instruct", {"projector", "lm"}),
                          ("full", {"vision", "projector", "lm"})):
        apply_stage(vlm, stage)
        counts = parameter_counts(vlm)
        assert {c for c in ("vision", "projector", "lm") if counts[c]["trainable"]} == trains
        assert not any(counts[c]["frozen"] for c in trains)
        assert {id(m) for m in frozen_modules(vlm)} == {id(getattr(vlm, c)) for c in {"vision", "projector", "lm"} - trains}
    with pytest.raises(ValueError, match="unknown training stage"):
        apply_stage(vlm, "pretrain")
    with pytest.raises(ValueError, match="stage 'align'"):
        apply_lora(vlm, {"r": 4}, "align")


def test_lora_without_peft_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed (`import peft` fails)
    vlm, _ = tiny_pair()
    with pytest.raises(ImportError, match=r"mmlm\[peft\]"):
        apply_lora(vlm, {"r": 4}, "instruct")


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft")
def test_lora_trains_adapters_only_and_merges(tmp_path):
    from mmlm.training.callbacks import export_model
    from mmlm import load

    module = built_module(stage="instruct", lora={"r": 4, "lora_alpha": 8})
    counts = parameter_counts(module.vlm)
    assert counts["vision"]["trainable"] == 0 and counts["lm"]["trainable"] < counts["lm"]["frozen"]
    export_model(module, tmp_path / "m")
    vlm, _ = load(tmp_path / "m", device="cpu")
    assert "lora" not in " ".join(n for n, _ in vlm.named_parameters())


def test_wrapping_the_lm_with_lora_warns_nothing():
    """peft reads transformers' deprecated ``is_gradient_checkpointing`` (a FutureWarning on every LoRA run)."""
    pytest.importorskip("peft")
    import warnings

    vlm, _ = tiny_pair()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        apply_lora(vlm, {"r": 4}, "instruct")


def test_a_misspelt_lora_target_module_is_refused_naming_the_lm_s_layers():
    pytest.importorskip("peft")
    with pytest.raises(ValueError, match=r"LoRA target_modules \['typo_proj'\] match no module of the LM; its linear "
                                         r"layers are named .*q_proj"):
        built_module(stage="instruct", lora={"r": 4, "target_modules": ["q_proj", "typo_proj"]})


def test_module_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown preset"):
        VLMModule(preset="huge")
    with pytest.raises(ValueError, match="unknown training stage"):
        VLMModule(stage="pretrain")
    with pytest.raises(ValueError, match="lr must be > 0"):
        VLMModule(lr=0.0)
    with pytest.raises(ValueError, match="stage 'align'"):
        VLMModule(stage="align", lora={"r": 8})


# ---------------------------------------------------------------------------------- building
def test_build_from_scratch_trains_a_tokenizer_on_the_shards():
    vlm, proc = build_model_and_processor(preset="tiny", model_overrides=TINY_OVERRIDES,
                                          train_shards=[str(shards() / "train")], tokenizer_vocab_size=320,
                                          max_length=160, log=lambda *_: None)
    tok = proc.tokenizer
    assert vlm.config.text.hf_config["vocab_size"] == len(tok) <= 320
    assert vlm.config.image_token_id == proc.image_token_id == tok.convert_tokens_to_ids("<image>")
    assert len(tok(proc.config.caption_prompt)["input_ids"]) <= 6  # the caption prompt is in the corpus
    assert proc.config.max_length == 160 and proc.config.num_image_tokens == vlm.num_image_tokens == 4
    batch = proc(images=[image()], conversations=[proc.caption_conversation("a small red star on the left")])
    assert torch.isfinite(vlm(**batch).loss)
    with pytest.raises(ValueError, match="needs the training shards"):
        build_model_and_processor(preset="tiny", train_shards=[])


def test_build_init_from_checkpoint_and_processor_bytes(tmp_path):
    from mmlm.checkpoint import save_pretrained

    vlm, proc = tiny_pair()
    save_pretrained(tmp_path / "ckpt", vlm, proc)
    vlm2, proc2 = build_from_checkpoint(tmp_path / "ckpt", max_length=64, caption_prompt="What is shown?")
    assert all(torch.equal(a, b) for a, b in zip(vlm.state_dict().values(), vlm2.state_dict().values()))
    assert proc2.config.max_length == 64 and proc2.config.caption_prompt == "What is shown?"
    assert proc2.config.image_placement == "as_written"
    _, proc4 = build_from_checkpoint(tmp_path / "ckpt", image_placement="after_text")
    assert proc4.config.image_placement == "after_text" and proc4.config.max_length == proc.config.max_length
    with pytest.raises(ValueError, match="unknown image_placement 'last'"):
        build_from_checkpoint(tmp_path / "ckpt", image_placement="last")
    proc3 = processor_from_files(processor_files(proc))
    conv = [{"role": "user", "content": "<image>what color?"}, {"role": "assistant", "content": "red"}]
    b1, b3 = proc(images=[image()], conversations=[conv]), proc3(images=[image()], conversations=[conv])
    assert torch.equal(b1["input_ids"], b3["input_ids"]) and torch.equal(b1["labels"], b3["labels"])


def test_build_with_a_local_pretrained_lm_grows_the_vocabulary(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from mmlm.processing import train_bpe_tokenizer
    from _tiny import CORPUS

    tok = train_bpe_tokenizer(CORPUS, vocab_size=300, special_tokens=["<pad>", "</s>", "<image>"], min_frequency=1)
    tok.chat_template = None
    hf = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
          "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": len(tok) - 1,
          "max_position_embeddings": 256, "tie_word_embeddings": True}
    lm = AutoModelForCausalLM.from_config(LlamaConfig(**{k: v for k, v in hf.items() if k != "model_type"}))
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    vlm, proc = build_model_and_processor(
        preset="tiny", model_overrides={**TINY_OVERRIDES, "text": {"name": str(tmp_path / "lm"), "pretrained": True,
                                                                   "hf_config": hf}},
        max_length=96, chat_template="vicuna_v1", log=lambda *_: None)
    vocab = vlm.lm.get_input_embeddings().num_embeddings
    assert vocab % 64 == 0 and vocab >= len(proc.tokenizer) and vlm.config.text.hf_config["vocab_size"] == vocab
    rows = len(tok) - 1
    assert torch.equal(vlm.lm.get_input_embeddings().weight[:rows], lm.get_input_embeddings().weight[:rows])
    batch = proc(images=[image()], conversations=[proc.caption_conversation("a red star")])
    assert "ASSISTANT:" in proc.tokenizer.decode(batch["input_ids"][0]) and (batch["labels"] != -100).any()
    assert torch.isfinite(vlm(**batch).loss)


def test_a_pretrained_lm_trains_with_its_dropout_on(tmp_path):
    """transformers' from_pretrained returns an eval-mode model: the module puts the parts that train in
    train mode (dropout on, as when the same LM is built from its config on resume) and the frozen ones in eval."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from mmlm.processing import train_bpe_tokenizer
    from _tiny import CORPUS

    tok = train_bpe_tokenizer(CORPUS, vocab_size=300, special_tokens=["<pad>", "</s>", "<image>"], min_frequency=1)
    tok.chat_template = None
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=256)).save_pretrained(
        tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    overrides = {**TINY_OVERRIDES, "text": {"name": str(tmp_path / "lm"), "pretrained": True}}
    for stage, lm_trains in (("full", True), ("align", False)):
        module = VLMModule(preset="tiny", model_overrides=overrides, chat_template="vicuna_v1", stage=stage, max_length=96)
        module.build()
        module.on_train_start()  # what Lightning calls; it no longer calls train() itself
        dropouts = [m for m in module.vlm.lm.modules() if isinstance(m, torch.nn.Dropout)]
        assert dropouts and all(m.training == lm_trains for m in dropouts), stage
        assert module.vlm.projector.training


def test_models_that_cannot_be_built_are_one_line_value_errors(tmp_path):
    from mmlm.checkpoint import save_pretrained
    from mmlm.training.build import build_from_checkpoint

    vlm, proc = tiny_pair()
    save_pretrained(tmp_path / "ckpt", vlm, proc)
    with pytest.raises(ValueError, match=r"must not change shapes\): size mismatch for lm\.") as e:
        build_from_checkpoint(tmp_path / "ckpt", model_overrides={"text": {"hf_config": {"intermediate_size": 96}}})
    assert "\n" not in str(e.value)
    # an LM name transformers cannot resolve (a typo, a hub name offline): its OSError, on one line
    module = VLMModule(preset="tiny", model_overrides={**TINY_OVERRIDES, "text": {"name": "/no/such/lm", "pretrained": True}})
    with pytest.raises(ValueError, match="/no/such/lm") as e:  # (transformers 4.x: huggingface_hub's ValueError)
        module.build()
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------- the module in a Trainer
def test_fast_dev_run_smoke_exports_a_loadable_model(tmp_path):
    from mmlm import describe, load

    module = VLMModule(**tiny_model_args())
    t = trainer(tmp_path, steps=2, callbacks=[TrainingMonitor(), Preflight(), ExportModel()], fast_dev_run=2)
    t.fit(module, datamodule(val=str(shards() / "val")))
    assert t.global_step == 2 and (tmp_path / "preflight.json").is_file()
    assert math.isfinite(float(t.callback_metrics["train/loss"]))
    assert {"perf/samples_per_s", "lr/lm", "lr/projector", "perf/real_token_frac"} <= set(t.callback_metrics)
    vlm, proc = load(tmp_path / "model", device="cpu")
    out = describe([image()], model=(vlm, proc), max_new_tokens=3)
    assert len(out) == 1 and isinstance(out[0], str)


def test_a_validation_that_scores_nothing_is_reported_once(tmp_path):
    """Validation batches without a labelled token log no val/loss (and so no best checkpoint): warned,
    once per run; a validation that scores is not."""

    class MaskLabels(pl.Callback):  # as if every validation sample's answer were masked
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            batch["labels"].fill_(-100)

    for masked in (True, False):
        module = VLMModule(**tiny_model_args())
        t = trainer(tmp_path / str(masked), steps=4, limit_val_batches=1, val_check_interval=2,
                    callbacks=[MaskLabels()] if masked else [])
        with _no_warning("scored no") if not masked else pytest.warns(UserWarning, match="scored no") as rec:
            t.fit(module, datamodule(val=str(shards() / "val")))
        assert ("val/loss" in t.callback_metrics) is not masked
        if masked:  # two validations (steps 2 and 4), one warning
            assert len([w for w in rec if "validation scored no sample" in str(w.message)]) == 1


class _no_warning:
    def __init__(self, text: str):
        self.text = text

    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings(record=True)
        self.records = self._cm.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)
        assert not [w for w in self.records if self.text in str(w.message)]


def test_monitor_hands_lightning_only_the_values_its_logger_writes(tmp_path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    module = VLMModule(**tiny_model_args())
    calls = []
    real_log_dict = module.log_dict
    module.log_dict = lambda metrics, **kw: (calls.append((module.global_step, kw.get("logger", True))),
                                             real_log_dict(metrics, **kw))
    t = trainer(tmp_path, steps=7, callbacks=[TrainingMonitor(bar_every=5)], logger=CSVLogger(tmp_path, name="logs"),
                log_every_n_steps=3)
    t.fit(module, datamodule())
    # logger values on Lightning's writing steps 3 and 6; no progress bar here, so no bar values
    assert calls == [(3, True), (6, True)]
    rows = list(csv.DictReader(open(tmp_path / "logs" / "version_0" / "metrics.csv")))
    written = sorted(int(r["step"]) for r in rows if r.get("perf/samples_per_s"))
    assert written == [2, 5] and all(float(r["lr/lm"]) > 0 for r in rows if r.get("lr/lm"))


def test_skips_are_logged_by_reason_and_per_validation_pass(tmp_path):
    import csv
    import io
    import shutil
    import tarfile

    from lightning.pytorch.loggers import CSVLogger

    def tar_with(path, members):  # [(name, bytes)]
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "w") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

    tar_with(tmp_path / "bad" / "bad-000000.tar", [(f"b{i}.png", b"junk") for i in range(3)]
             + [(f"b{i}.txt", b"a red star") for i in range(3)] + [("e0.png", b"junk"), ("e0.txt", b"")])
    val = tmp_path / "val"  # the synthetic val shard plus one corrupt sample: every pass skips exactly one
    shutil.copytree(shards() / "val", val)
    tar_with(val / "zz-000000.tar", [("v0.png", b"junk"), ("v0.txt", b"a red star")])
    module = VLMModule(**tiny_model_args())
    dm = datamodule(train=[{"shards": str(shards() / "train"), "weight": 1}, {"shards": str(tmp_path / "bad"),
                                                                              "weight": 2}],
                    val=str(val), max_bad_fraction=None)
    t = trainer(tmp_path, steps=6, callbacks=[TrainingMonitor()], logger=CSVLogger(tmp_path, name="logs"),
                log_every_n_steps=1, limit_val_batches=None, val_check_interval=3, check_val_every_n_epoch=None)
    t.fit(module, dm)
    rows = list(csv.DictReader(open(tmp_path / "logs" / "version_0" / "metrics.csv")))
    last = max((r for r in rows if r.get("data/skipped")), key=lambda r: int(r["step"]))
    counts = dm.skipped_counts()
    assert len(counts) == 2 and counts["empty_caption"] > 0  # the "junk" images and the empty caption
    assert float(last["data/skipped"]) == sum(counts.values())
    for reason, n in counts.items():
        assert float(last[f"data/skipped/{reason}"]) == n, reason
    val_skips = [float(r["data/val_skipped"]) for r in rows if r.get("data/val_skipped")]
    assert val_skips == [1.0, 1.0]  # two passes (steps 3 and 6), one skip each, not a running total
    assert sum(dm.skipped_counts("val").values()) == 2


def test_logged_learning_rates_are_those_of_the_step_they_are_logged_with(tmp_path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    from mmlm.training.optim import warmup_cosine

    module = VLMModule(**tiny_model_args(warmup=3))
    t = trainer(tmp_path, steps=6, callbacks=[TrainingMonitor()], logger=CSVLogger(tmp_path, name="logs"),
                log_every_n_steps=1)
    t.fit(module, datamodule())
    rows = list(csv.DictReader(open(tmp_path / "logs" / "version_0" / "metrics.csv")))
    logged = {int(r["step"]): float(r["lr/lm"]) for r in rows if r.get("lr/lm")}
    fn = warmup_cosine(6, 3)
    assert logged == pytest.approx({step: 3e-3 * fn(step) for step in range(6)})
    assert logged[0] == 0.0  # the first step's update runs at the warmup's zero rate


def test_packing_a_model_with_shared_image_positions_is_refused_before_any_step(tmp_path):
    shared = {**TINY_OVERRIDES, "image_positions": "shared",
              "projector": {**TINY_OVERRIDES["projector"], "position_embedding": True}}
    module = VLMModule(**tiny_model_args(model_overrides=shared))
    t = trainer(tmp_path, steps=2, callbacks=[Preflight()])
    with pytest.raises(ValueError, match="data.packing true cannot train a model with shared image positions"):
        t.fit(module, datamodule(packing=True))
    assert not (tmp_path / "preflight.json").exists()


class _Snapshot(pl.Callback):
    def __init__(self):
        self.before, self.after, self.modes = {}, {}, []

    @staticmethod
    def _state(pl_module):
        return {k: v.detach().clone() for k, v in pl_module.vlm.state_dict().items()}

    def on_train_start(self, trainer, pl_module):
        self.first = self._state(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[trainer.global_step] = self._state(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step - 1] = self._state(pl_module)
        v = pl_module.vlm
        self.modes.append((v.vision.training, v.projector.training, v.lm.training))


def test_align_step_keeps_frozen_parameters_bit_identical(tmp_path):
    module = VLMModule(**tiny_model_args(stage="align", lr=1e-2))
    snap = _Snapshot()
    trainer(tmp_path, steps=2, callbacks=[snap]).fit(module, datamodule())
    end = module.vlm.state_dict()
    changed = {k.split(".")[0] for k, v in end.items() if not torch.equal(v, snap.first[k])}
    assert changed == {"projector"}  # vision (incl. batch-norm statistics) and LM untouched, bit for bit
    assert snap.modes == [(False, True, False)] * 2  # frozen parts ran in eval mode


def test_nonfinite_loss_skips_the_step_then_aborts(tmp_path):
    class Poison(pl.Callback):
        def __init__(self, steps):
            self.steps = steps

        def on_train_start(self, trainer, pl_module):
            vlm, original = pl_module.vlm, pl_module.vlm.forward

            def forward(*args, **kwargs):
                out = original(*args, **kwargs)
                if trainer.global_step in self.steps:
                    out.loss = out.loss * float("nan")
                return out

            vlm.forward = forward

    module = VLMModule(**tiny_model_args(max_nonfinite=3))
    snap = _Snapshot()
    trainer(tmp_path, steps=3, callbacks=[Poison({1}), snap]).fit(module, datamodule())
    params = {n for n, _ in module.vlm.named_parameters()}  # (batch-norm statistics do move in a forward pass)
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in params)  # noqa: E731
    assert same(snap.before[1], snap.after[1])  # the poisoned step changed no parameter
    assert not same(snap.before[0], snap.after[0]) and not same(snap.before[2], snap.after[2])
    assert module.guard.skipped == 1 and module.guard.in_a_row == 0

    module = VLMModule(**tiny_model_args(max_nonfinite=2))
    with pytest.raises(NonFiniteLossError, match="2 times in a row"):
        trainer(tmp_path, steps=5, callbacks=[Poison(set(range(10)))]).fit(module, datamodule())
    guard = NonFiniteGuard(0)
    assert not any(guard.update(False) for _ in range(50))  # 0: never aborts


def test_nonfinite_micro_batch_drops_its_whole_accumulation_window(tmp_path):
    class PoisonCall(pl.Callback):  # the 3rd forward pass: the first micro-batch of the second window
        def on_train_start(self, trainer, pl_module):
            vlm, original, calls = pl_module.vlm, pl_module.vlm.forward, [0]

            def forward(*args, **kwargs):
                out = original(*args, **kwargs)
                calls[0] += 1
                if calls[0] == 3:
                    out.loss = out.loss * float("nan")
                return out

            vlm.forward = forward

    module = VLMModule(**tiny_model_args(max_nonfinite=3))
    snap = _Snapshot()
    trainer(tmp_path, steps=3, callbacks=[PoisonCall(), snap], accumulate_grad_batches=2).fit(module, datamodule())
    params = {n for n, _ in module.vlm.named_parameters()}
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in params)  # noqa: E731
    assert module.trainer.global_step == 3 and module.guard.skipped == 1 and module.guard.in_a_row == 0
    assert not same(snap.first, snap.before[1])  # window 0 stepped
    assert same(snap.before[1], snap.after[1])  # window 1 (one NaN micro-batch of two) changed nothing
    assert not same(snap.after[1], snap.after[2])  # window 2 stepped again


def test_preflight_fails_a_template_that_masks_every_label(tmp_path):
    class Masking(VLMModule):
        def _install(self, vlm, processor, files):
            processor.tokenizer.chat_template = MASKING_TEMPLATE
            super()._install(vlm, processor, files)

    with pytest.raises(PreflightError, match="template masks every label"):
        trainer(tmp_path, steps=2, callbacks=[Preflight(num_batches=1)]).fit(Masking(**tiny_model_args()),
                                                                            datamodule())
    # the same data with the right template passes, and the report says what it saw
    module = built_module()
    dm = datamodule()
    dm.attach_processor(module.processor)
    batches = [b for _, b in zip(range(2), dm.train_dataloader())]
    rep = run_preflight(module, batches, precision="bf16-mixed")
    assert not rep.errors and 0 < rep.label_coverage < 1 and rep.samples == 8
    assert rep.image_tokens == rep.image_tokens_expected == 8 * 4 and 0 < rep.real_token_fraction <= 1
    assert rep.parameters["total"]["frozen"] == 0 and rep.memory["total"] > 0
    assert "template masks every label" in "".join(
        analyse_batches([{**batches[0], "labels": torch.full_like(batches[0]["labels"], -100)}],
                        image_token_id=module.processor.image_token_id, num_image_tokens=4, max_length=160).errors)


def test_preflight_blames_a_short_max_length_not_the_template(tmp_path):
    """A max_length that cuts the probes' answers is no template fault; one that cannot hold an image fails
    the run with that reason before any data is read."""
    import dataclasses

    from mmlm.training.preflight import check_max_length, check_template

    module = built_module()
    assert module.vlm.num_image_tokens == 4
    short = dataclasses.replace(module.processor.config, max_length=8)
    module.processor.config = short
    assert check_template(module.processor) == [] and module.processor.config is short
    assert check_max_length(module) == []  # 8 tokens hold the 4 image tokens
    assert "cannot hold one image (4 image tokens)" in check_max_length(module, datamodule(max_length=4))[0]
    with pytest.raises(PreflightError, match=r"max_length=4 cannot hold one image"):
        trainer(tmp_path, steps=1, callbacks=[Preflight(num_batches=1)]).fit(
            VLMModule(**tiny_model_args()), datamodule(max_length=4))


def test_preflight_counts_packed_samples_not_the_rows_padding():
    from types import SimpleNamespace

    from mmlm.data.collate import PackCollate

    def sample(n):  # a template token, then n - 1 supervised tokens
        ids = torch.arange(1, n + 1)
        return {"input_ids": ids, "labels": torch.cat([torch.tensor([-100]), ids[1:]]), "num_images": 0,
                "pixel_values": None}

    pack = PackCollate(SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=0)), max_length=16)
    batch = pack.collate_rows([[sample(5), sample(6)], [sample(4)]])  # row 1 ends in 7 padding tokens (2 segments)
    rep = analyse_batches([batch], image_token_id=99, num_image_tokens=0, max_length=16, pad_token_id=0)
    assert rep.samples == batch["num_samples"] == 3 and rep.samples_without_labels == 0 and not rep.warnings
    two = [{**batch, "skipped": {"no_target": 2}}, {**batch, "skipped": {"no_target": 1, "corrupt_image": 1}}]
    summed = analyse_batches(two, image_token_id=99, num_image_tokens=0, max_length=16, pad_token_id=0)
    assert summed.skipped == {"no_target": 3, "corrupt_image": 1}  # each batch's are the skips since the last
    unaware = analyse_batches([batch], image_token_id=99, num_image_tokens=0, max_length=16)
    assert unaware.samples == 5 and unaware.samples_without_labels == 2  # what the report said before


def test_memory_estimate_follows_precision_stage_and_checkpointing():
    vlm, _ = tiny_pair()  # 2 vision blocks, 2 LM layers
    geom = dict(batch_size=8, seq_len=128, num_images=8)
    fp32 = estimate_memory(vlm, precision="32-true", **geom)
    mixed = estimate_memory(vlm, precision="bf16-mixed", **geom)
    half = estimate_memory(vlm, precision="bf16-true", **geom)
    n = sum(p.numel() for p in vlm.parameters())
    assert fp32["weights"] == 4 * n and fp32["optimizer"] == 8 * n and fp32["grads"] == 4 * n
    assert half["weights"] == 2 * n and mixed["autocast"] == 2 * n and fp32["autocast"] == 0
    assert mixed["activations"] < fp32["activations"]
    fp64 = estimate_memory(vlm, precision="64-true", **geom)
    assert fp64["weights"] == 8 * n and fp64["activations"] == 2 * fp32["activations"]
    ckpt = estimate_memory(vlm, precision="32-true", activation_checkpointing=True, **geom)
    assert ckpt["activations"] < fp32["activations"]
    apply_stage(vlm, "align")
    align = estimate_memory(vlm, precision="32-true", **geom)
    assert align["grads"] == 4 * parameter_counts(vlm)["projector"]["trainable"]


def test_uint8_training_needs_the_processor_s_normalisation_to_be_the_model_s():
    """uint8 batches are normalised by the model with its own mean/std; describe/eval normalise with
    the processor's: a mismatch would train and infer on differently normalised images."""
    import dataclasses

    from mmlm.training.checks import check_normalization

    vlm, proc = tiny_pair()
    check_normalization(vlm, proc)  # built together: they agree
    proc.config = dataclasses.replace(proc.config, image_transform=dataclasses.replace(
        proc.config.image_transform, mean=(0.485, 0.456, 0.406)))
    with pytest.raises(ValueError, match=r"the processor normalises images with mean=\(0.485, 0.456, 0.406\)"):
        check_normalization(vlm, proc)


@pytest.mark.parametrize("precision", [
    "bf16-mixed",
    pytest.param("16-mixed", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 AMP needs CUDA")),
])
def test_mixed_precision_clips_gradients_and_steps(tmp_path, precision):
    """Lightning refuses to clip under AMP with a fused optimizer (meant for 16-mixed, whose fused
    step unscales inside); bf16-mixed has no loss scale, so mmlm clips itself and keeps fused AdamW,
    and 16-mixed with clipping gets the non-fused optimizer. Both must train, clipped."""
    module = VLMModule(**tiny_model_args(lr=1e-2))
    norms = []

    class Spy(pl.Callback):  # the gradients the step used (zeroed only at the next step's backward)
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            grads = [p.grad for p in pl_module.vlm.parameters() if p.grad is not None]
            norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    snap = _Snapshot()
    accelerator = "cuda" if precision == "16-mixed" else "cpu"
    trainer(tmp_path, steps=2, callbacks=[snap, Spy()], precision=precision, gradient_clip_val=1e-3,
            accelerator=accelerator).fit(module, datamodule())
    fused = module.trainer.optimizers[0].defaults.get("fused")
    assert bool(fused) == (precision == "bf16-mixed")
    assert len(norms) == 2 and all(n <= 1e-3 * (1 + 1e-3) for n in norms)  # clipped before each step
    end = module.vlm.state_dict()
    assert any(not torch.equal(v.cpu(), snap.first[k].cpu()) for k, v in end.items())  # and the weights moved


def test_bf16_true_training_keeps_the_rotary_frequencies_float32(tmp_path):
    """Lightning's "bf16-true" casts the whole model; the rotary inverse frequencies go back to their
    float32 values (as transformers and ``mmlm.load`` keep them), while the weights train in bf16."""
    module = VLMModule(**tiny_model_args())
    seen = {}

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.update({n: b.clone() for n, b in pl_module.vlm.named_buffers() if n.endswith("inv_freq")})
            seen["weight dtype"] = next(pl_module.vlm.lm.parameters()).dtype

    trainer(tmp_path, steps=1, callbacks=[Spy()], precision="bf16-true").fit(module, datamodule())
    assert seen.pop("weight dtype") == torch.bfloat16
    cfg = module.vlm.lm.config
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta") or cfg.rope_theta
    dim = cfg.hidden_size // cfg.num_attention_heads
    expect = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # the LM's own formula
    assert seen
    for name, value in seen.items():
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value, expect, msg=name)


def test_compile_blocks_compiles_every_layer_in_place_and_keeps_outputs(monkeypatch, tmp_path):
    from mmlm.training import compile as regional

    vlm, _ = tiny_pair()
    keys = list(vlm.state_dict())
    vlm.eval()
    with torch.no_grad():
        ids = torch.randint(0, 50, (2, 12))
        ref = vlm.lm(input_ids=ids).logits
    n = regional.compile_blocks(vlm, backend="eager")
    assert n == len(regional.decoder_layers(vlm.lm)) + len(regional.vision_blocks(vlm.vision)) + 1 > 1
    assert vlm.projected_loss is not projected_cross_entropy  # the loss projection is compiled too
    assert list(vlm.state_dict()) == keys  # in place: checkpoints and export see the same names
    with torch.no_grad():
        torch.testing.assert_close(vlm.lm(input_ids=ids).logits, ref)
    with pytest.raises(ValueError, match="no decoder layers"):
        regional.decoder_layers(torch.nn.Linear(2, 2))
    # VLMModule(compile=True) compiles after building and trains (the eager backend keeps this fast)
    monkeypatch.setattr(regional, "DEFAULT_BACKEND", "eager")
    module = VLMModule(**tiny_model_args(compile=True))
    trainer(tmp_path, steps=2).fit(module, datamodule())
    layers = regional.decoder_layers(module.vlm.lm)
    assert all(getattr(layer, "_compiled_call_impl", None) is not None for layer in layers)
