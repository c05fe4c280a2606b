"""``mmlm fit``: train a VLM with LightningCLI (``VLMModule`` + ``VLMDataModule``).

Usage::

    mmlm fit --config configs/tiny-cpu.yaml
    mmlm fit --config configs/tiny-cpu.yaml --trainer.max_steps 200 --data.batch_size 8
    mmlm fit --config configs/tiny-cpu.yaml --ckpt_path last          # resume the run
    mmlm fit --config configs/tiny-cpu.yaml --print_config            # the full resolved config
    mmlm fit --help                                                   # every option, documented

Sections: ``trainer`` (lightning.Trainer), ``model`` (mmlm.training.VLMModule), ``data``
(mmlm.data.VLMDataModule), ``checkpoint`` (ModelCheckpoint; a step's save waits for the validation
right after it, so ``best-step=N.ckpt`` is ranked by step N's ``val/loss``; ``last.ckpt`` does not wait
for a first validation, nor need validation data), ``preflight``, ``monitor``
(throughput/lr), ``signals`` (SIGTERM/SIGUSR1/SIGINT checkpointing), ``export`` (final model), plus
``seed_everything`` (default 0; it also seeds the data stream unless ``data.seed`` is given) and ``ckpt_path``.
``--model.model_overrides`` and ``--model.lora`` flags merge into the config's mapping key by key (a
plain LightningCLI would replace the whole mapping); a ``null`` flag resets it.

Run directory (``--trainer.default_root_dir``; default ``runs/<config file name>``)::

    RUN_DIR/config.yaml                    full resolved config of the latest start
    RUN_DIR/checkpoints/last.ckpt          resumable checkpoint: every checkpoint.every_n_train_steps
                                           steps, at the last step and on SIGTERM/SIGUSR1/Ctrl-C (resume or
                                           extend: --ckpt_path last)
    RUN_DIR/checkpoints/best-step=N.ckpt   best by checkpoint.monitor (val/loss)
    RUN_DIR/logs/version_K/metrics.csv     CSV logs, one version per start (plot: mmlm plot RUN_DIR)
    RUN_DIR/logs/version_K/config.yaml     config of that start (+ hparams.yaml)
    RUN_DIR/tensorboard/version_K/         TensorBoard logs, when tensorboard is installed
    RUN_DIR/preflight.json                 pre-flight report (labels, images, truncation, memory)
    RUN_DIR/model/                         final model + processor: mmlm.load(), mmlm describe --model

``--ckpt_path last`` with no checkpoint yet starts a fresh run (so job scripts can always pass it); a new
run (no ``--ckpt_path``) into a RUN_DIR that holds a run's checkpoints or model is refused.
A resumed run (``--ckpt_path FILE`` or ``last``) takes its options from the command line and configs as
given, not from the checkpoint, and warns about each ``--model`` option that differs from the checkpoint's
run; the weights, optimizer, learning-rate schedule, loader position and RNG continue from the checkpoint.
Exit codes: 0 done; 1 training failed (non-finite losses, pre-flight, a write error); 2 bad arguments or
inputs; 128+N stopped by signal N after saving ``last.ckpt`` (130: Ctrl-C).

Defaults that differ from Lightning's: ``check_val_every_n_epoch: null`` and
``val_check_interval: 500`` (the training stream is endless: validation counts batches),
``use_distributed_sampler: false`` (the data module shards by rank itself),
``log_every_n_steps: 10``; without ``data.val``, ``limit_val_batches: 0``. ``trainer.max_steps`` is required
(the schedule needs the run's length); ``trainer.max_epochs`` is refused (an epoch of the endless
stream never ends) unless ``limit_train_batches`` sets an epoch's length.
Global batch = data.batch_size x trainer.accumulate_grad_batches x devices x num_nodes.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

from mmlm.cli.fit_checks import (
    check_checkpoint_file,
    check_init_from,
    check_last_checkpoint,
    check_max_steps,
    check_new_run_dir,
    check_shards,
    check_writable,
    find_last_checkpoint,
    option_strings,
    suggest_option,
)

FIT_DESCRIPTION = (__doc__ or "").split("Usage::")[0].strip()
FIT_HELP = (__doc__ or "").replace("::\n", ":\n").replace("``", "`").strip()
"""``mmlm fit --help``'s text above the options: this module's docstring (usage, sections, run directory,
exit codes), its line breaks kept."""


def _help_formatter():
    """jsonargparse's help formatter that keeps the description's line breaks (tables, usage lines)."""
    import argparse

    from jsonargparse import DefaultHelpFormatter

    class KeepDescriptionLines(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
        pass

    return KeepDescriptionLines

TRAINER_DEFAULTS = {
    "check_val_every_n_epoch": None,
    "val_check_interval": 500,
    "log_every_n_steps": 10,
    "use_distributed_sampler": False,
}
CHECKPOINT_DEFAULTS = {
    "checkpoint.every_n_train_steps": 500,
    "checkpoint.save_last": True,
    "checkpoint.monitor": "val/loss",
    "checkpoint.mode": "min",
    "checkpoint.save_top_k": 1,
    "checkpoint.filename": "best-{step}",
}


def _cli_classes():
    from lightning.pytorch.callbacks import ProgressBar
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

    from lightning.pytorch.cli import LightningArgumentParser

    from mmlm.training.callbacks import ExportModel, SignalCheckpoint, StepCheckpoint, TrainingMonitor
    from mmlm.training.preflight import Preflight

    class FitParser(LightningArgumentParser):
        """A bad option is a short usage line and the error (with the option it may have meant), not the
        usage of every option (120 lines)."""

        def print_usage(self, file=None) -> None:
            (file or sys.stderr).write("usage: mmlm fit [--config FILE.yaml ...] [--section.key VALUE ...]\n")

        def error(self, message, *args, **kwargs):
            return super().error(suggest_option(str(message), option_strings(self)), *args, **kwargs)

    class SaveRunConfig(SaveConfigCallback):
        """Also writes the config to RUN_DIR/config.yaml (rank 0), when training starts: a run refused during
        set-up (a resume whose data options changed, a pre-flight failure) leaves the config of the run that
        trained, not its own."""

        def setup(self, trainer, pl_module, stage: str) -> None:
            pass  # see on_train_start

        def on_train_start(self, trainer, pl_module) -> None:
            super().setup(trainer, pl_module, "fit")

        def save_config(self, trainer, pl_module, stage) -> None:
            path = Path(trainer.default_root_dir) / self.config_filename
            path.parent.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(path), skip_none=False, overwrite=True, multifile=False)

    class ParsedOnly(Exception):
        def __init__(self, config):
            super().__init__("parsed")
            self.config = config

    class FitCLI(LightningCLI):
        parse_only = False
        created_root: str | None = None  # the run directory this fit creates (set on the per-call subclass)
        made_trainer = None  # the Trainer, once instantiated

        def init_parser(self, **kwargs):
            self.parser_class = FitParser
            return super().init_parser(**kwargs)

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_lightning_class_args(StepCheckpoint, "checkpoint")
            parser.set_defaults(CHECKPOINT_DEFAULTS)
            parser.add_lightning_class_args(Preflight, "preflight")
            parser.add_lightning_class_args(TrainingMonitor, "monitor")
            parser.add_lightning_class_args(SignalCheckpoint, "signals")
            parser.add_lightning_class_args(ExportModel, "export")

        def before_instantiate_classes(self) -> None:
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            root = cfg.trainer.default_root_dir
            if not root:
                configs = cfg.get("config") or []
                name = Path(str(configs[-1])).stem if configs else "fit"
                root = os.path.join("runs", name)
                cfg.trainer.default_root_dir = root
            if cfg.checkpoint.dirpath is None:
                cfg.checkpoint.dirpath = os.path.join(str(root), "checkpoints")
            t = cfg.trainer
            if (t.max_steps is None or t.max_steps < 0) and not t.fast_dev_run and t.limit_train_batches in (None, 1.0):
                raise ValueError("set --trainer.max_steps: the training stream is endless, and the learning-rate "
                                 "schedule (warmup + cosine) needs the run's length")
            if t.max_epochs not in (None, -1) and not t.fast_dev_run and t.limit_train_batches in (None, 1.0):
                raise ValueError(f"trainer.max_epochs {t.max_epochs} does not bound the run: the training stream is "
                                 "endless (resampled), so an epoch never ends; set --trainer.max_steps instead (one "
                                 "pass over N samples: N / global batch steps) and --trainer.max_epochs null")
            if t.accumulate_grad_batches is not None and t.accumulate_grad_batches < 1:
                raise ValueError(f"trainer.accumulate_grad_batches must be >= 1, got {t.accumulate_grad_batches}")
            vci = t.val_check_interval
            if isinstance(vci, (int, float)) and not isinstance(vci, bool) and vci <= 0:
                raise ValueError(f"trainer.val_check_interval must be > 0 (training batches between validations), "
                                 f"got {vci}")
            if isinstance(t.strategy, str) and t.strategy.endswith("_spawn"):
                raise ValueError(f"trainer.strategy {t.strategy} is not supported: use ddp (or ddp_fork, fsdp), which "
                                 "start the processes themselves")
            data = cfg.get("data")
            batches = (t.max_steps or 0) * (t.accumulate_grad_batches or 1)
            if data is not None and data.get("val") is not None and isinstance(vci, int) and not isinstance(vci, bool) \
                    and 0 < batches < vci and t.limit_val_batches not in (0, 0.0):
                warnings.warn(f"no validation will run: trainer.val_check_interval {vci} training batches is more than "
                              f"the run's {batches} (max_steps {t.max_steps} x accumulate_grad_batches "
                              f"{t.accumulate_grad_batches or 1}): no val/loss, no best checkpoint; lower "
                              "--trainer.val_check_interval", stacklevel=1)
            if data is not None and "val" in data and data.val is None:
                t.limit_val_batches = 0  # no validation loop: checkpoints must not wait for a val/loss
            if self.parse_only:
                raise ParsedOnly(self.config)
            check_shards(self.datamodule_class, data)  # before anything is written
            check_writable(root, "--trainer.default_root_dir")
            check_writable(cfg.checkpoint.dirpath, "--checkpoint.dirpath")
            if not cfg.get("ckpt_path"):  # a resumed run rebuilds its model from the checkpoint, not init_from
                check_init_from(cfg.get("model"))
                export = cfg.get("export")
                check_new_run_dir(str(root), cfg.checkpoint.dirpath,
                                  (export.get("dirname") if export is not None else None) or "model")
            if not os.path.exists(str(root)):
                type(self).created_root = str(root)

        def _parse_ckpt_path(self) -> None:
            # a --ckpt_path that is no checkpoint file is a bad argument, reported before anything is
            # written (Lightning's own reading of it raised a traceback, or failed after set-up).
            # Lightning would also replace the --model options with the checkpoint's hyperparameters here,
            # for a file but not for `last`: not done, so both resume the same way (the options given;
            # VLMModule.on_load_checkpoint names any that differ from the checkpoint's run)
            sub = self.config.get("subcommand")
            ckpt = self.config[sub].get("ckpt_path") if sub else None
            if str(ckpt) in ("best", "hpc"):  # Lightning's in-process names: a new process has no "best" yet
                raise ValueError(f"--ckpt_path {ckpt}: a new run has no {ckpt} checkpoint to resume; pass `last` or "
                                 "a .ckpt file (the best ones are RUN_DIR/checkpoints/best-step=N.ckpt)")
            if ckpt and str(ckpt) != "last" and "://" not in str(ckpt) and not str(ckpt).startswith("registry"):
                check_checkpoint_file(str(ckpt))

        def instantiate_trainer(self, **kwargs):
            tcfg = self._get(self.config_init, "trainer", default={})
            if tcfg.get("logger") in (None, True) and "logger" not in kwargs:
                kwargs["logger"] = default_loggers(tcfg.get("default_root_dir") or os.getcwd())
            callbacks = tcfg.get("callbacks") or []
            callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
            if tcfg.get("enable_progress_bar", True) is not False and not any(
                    isinstance(c, ProgressBar) for c in callbacks):
                tcfg["callbacks"] = [*callbacks, default_progress_bar()]
            if tcfg.get("plugins") is None and "plugins" not in kwargs:  # checkpoint files whole or not there
                from mmlm.training.checkpoint_io import AtomicCheckpointIO

                kwargs["plugins"] = [AtomicCheckpointIO()]
            type(self).made_trainer = trainer = super().instantiate_trainer(**kwargs)
            return trainer

        def before_fit(self) -> None:
            cfg = self.config_init[self.subcommand]
            ckpt = cfg.get("ckpt_path")
            last = ckpt == "last"
            if last:
                ckpt = find_last_checkpoint(cfg.checkpoint.dirpath)
                cfg["ckpt_path"] = ckpt
                if ckpt is None:
                    print(f"no checkpoint in {cfg.checkpoint.dirpath}: starting a fresh run", file=sys.stderr)
            if ckpt and os.path.isfile(str(ckpt)):
                if last:  # a file given by name was checked with the arguments
                    check_last_checkpoint(str(ckpt))
                check_max_steps(str(ckpt), cfg.trainer.max_steps)
                self.model.resume_from = str(ckpt)
            print(f"run directory: {cfg.trainer.default_root_dir}", file=sys.stderr)

    return FitCLI, SaveRunConfig, ParsedOnly


def default_loggers(root: str) -> list:
    """CSVLogger under RUN_DIR/logs, and TensorBoardLogger under RUN_DIR/tensorboard when installed."""
    from lightning.pytorch.loggers import CSVLogger

    loggers = [CSVLogger(save_dir=root, name="logs")]
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            return loggers
    from lightning.pytorch.loggers import TensorBoardLogger

    loggers.append(TensorBoardLogger(save_dir=root, name="tensorboard", default_hp_metric=False))
    return loggers


def default_progress_bar(metrics_every: int = 10):
    """Lightning's progress bar, printing metrics with 3 significant digits (learning rates are small).

    The metrics shown are read every ``metrics_every`` training steps, not every step: reading them
    turns the logged loss (a device tensor) into a number, which makes the host wait for the GPU.
    """
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    try:
        import rich  # noqa: F401 - Lightning's RichProgressBar needs it (a dependency of mmlm)
        from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme
    except ImportError:
        return TQDMProgressBar(refresh_rate=metrics_every)

    class _RichBar(RichProgressBar):
        # the training stream is endless: an "epoch" means nothing (Lightning would show "Epoch 0/-2" and, after a
        # resume with a larger max_steps, "400/200"); the training bar counts optimizer steps up to max_steps

        @property
        def total_train_batches(self):
            steps = self.trainer.max_steps
            return steps if steps and steps > 0 else super().total_train_batches

        def _get_train_description(self, current_epoch: int) -> str:
            steps = self.trainer.max_steps
            text = "Training (steps)" if steps and steps > 0 else super()._get_train_description(current_epoch)
            return f"{text:{len(self.validation_description)}}"

        def _update(self, progress_bar_id, current, *args, **kwargs) -> None:  # 2.6.x signatures differ
            steps = self.trainer.max_steps if self._trainer is not None else None
            if progress_bar_id is not None and progress_bar_id == self.train_progress_bar_id and steps and steps > 0:
                current = self.trainer.global_step
            super()._update(progress_bar_id, current, *args, **kwargs)

        def _update_metrics(self, trainer, pl_module, *args, **kwargs) -> None:  # Lightning 2.6.0 adds arguments
            if trainer.training and not trainer.sanity_checking and trainer.global_step % metrics_every:
                return  # the step count still advances; the numbers next to it wait for the next read
            super()._update_metrics(trainer, pl_module, *args, **kwargs)

    return _RichBar(theme=RichProgressBarTheme(metrics_format=".3g"))


def _datamodule_class():
    try:
        from mmlm.data import VLMDataModule
    except ImportError as e:
        raise ImportError(f"mmlm.data.VLMDataModule is not available: {e}") from e
    return VLMDataModule


MERGED_OPTIONS = ("model.model_overrides", "model.lora")
"""Mapping options whose command-line flags merge into the config's value instead of replacing it."""


_UNSET = object()


def _config_value(value: str, option: str):
    """``option`` (dotted) in one ``--config`` value (a YAML file or inline YAML); ``_UNSET`` when the
    config does not set it or is unreadable (the parser reports that itself)."""
    import yaml

    try:
        data = yaml.safe_load(Path(value).read_text() if os.path.isfile(value) else value)
    except (OSError, yaml.YAMLError):
        return _UNSET
    for key in option.split("."):
        if not isinstance(data, dict) or key not in data:
            return _UNSET
        data = data[key]
    return data


def merge_dict_flags(argv: list[str]) -> list[str]:
    """``argv`` with the flags of each :data:`MERGED_OPTIONS` option (``--model.model_overrides[.KEY...]
    VALUE``, ``--model.lora[.KEY] VALUE``) merged into the config files' value and passed on as one flag.

    jsonargparse replaces a mapping option wholesale, so ``--config configs/align-small.yaml
    --model.model_overrides '{text: {attn_implementation: flex_attention}}'`` would silently drop the
    recipe's ``{vision: {pretrained: true}, text: {pretrained: true}}`` and train from random weights.
    Here the flags merge key by key, in order, onto the last config's value; a flag whose value is
    ``null`` resets it (``--model.model_overrides null`` drops the recipe's, ``--model.lora null`` turns
    LoRA off). The merged flag goes last, so ``--print_config`` and the saved config.yaml show it.
    """
    import yaml

    from mmlm.config import deep_merge

    flags: dict[str, list] = {}
    rest, configs, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        name, eq, inline = arg.partition("=")
        option = next((o for o in MERGED_OPTIONS if name == "--" + o or name.startswith(f"--{o}.")), None)
        if option is not None:
            if eq:
                value = inline
            elif i + 1 < len(argv):
                value, i = argv[i + 1], i + 1
            else:
                raise ValueError(f"{name} needs a value (YAML, e.g. '{{text: {{attn_implementation: sdpa}}}}')")
            flags.setdefault(option, []).append((name, [k for k in name[len(option) + 2:].split(".") if k], value))
        else:
            rest.append(arg)
            if name == "--config" and (eq or i + 1 < len(argv)):
                configs.append(inline if eq else argv[i + 1])
        i += 1
    for option, items in flags.items():
        merged = None
        for config in configs:  # a later config that sets it replaces the value, as the parser does
            found = _config_value(config, option)
            merged = merged if found is _UNSET else found
        for name, path, value in items:
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise ValueError(f"{name}: not YAML: {value!r} ({str(e).splitlines()[0]})") from None
            for key in reversed(path):
                parsed = {key: parsed}
            if parsed is None:
                merged = None
            elif not isinstance(parsed, dict):
                raise ValueError(f"{name} takes a mapping (e.g. '{{text: {{pretrained: true}}}}'), got {value!r}")
            else:
                merged = merged if isinstance(merged, dict) else {}
                deep_merge(merged, parsed)  # merged is this function's own copy (parsed YAML)
        rest += ["--" + option, json.dumps(merged)]
    return rest


def make_cli(argv: list[str] | None = None, *, datamodule_class=None, parse_only: bool = False):
    """Run (or with ``parse_only`` just parse) ``mmlm fit ARGV``; returns the LightningCLI
    (``cli.trainer``, ``cli.model``, ``cli.datamodule``) or, when parsing only, the config."""
    from mmlm.training.module import VLMModule

    FitCLI, SaveRunConfig, ParsedOnly = _cli_classes()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fit"]:
        argv = argv[1:]
    argv = merge_dict_flags(argv)
    dm_class = datamodule_class or _datamodule_class()
    cli_class = type("FitCLI", (FitCLI,), {"parse_only": parse_only})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
        formatter = _help_formatter()
        try:
            return cli_class(
                VLMModule,
                dm_class,
                save_config_callback=SaveRunConfig,
                save_config_kwargs={"overwrite": True},
                trainer_defaults=dict(TRAINER_DEFAULTS),
                seed_everything_default=0,
                parser_kwargs={"prog": "mmlm", "formatter_class": formatter,  # the subcommand's: newer jsonargparse
                               "fit": {"description": FIT_HELP, "formatter_class": formatter}},  # older
                auto_configure_optimizers=False,
                args=["fit", *argv],
            )
        except ParsedOnly as parsed:
            return parsed.config
        except (Exception, KeyboardInterrupt):
            remove_untrained_run_dir(cli_class.created_root, cli_class.made_trainer)
            raise


def remove_untrained_run_dir(root: str | None, trainer) -> None:
    """Delete the run directory a failed fit created (``root``; None: it existed before) when the failure came
    before the first training step (a bad tokenizer source, a SIGTERM during set-up) and it holds only the
    configs written at start (config.yaml, the loggers' hparams): they record nothing, and would leave a
    directory that looks like a run. Anything else keeps it: a run that trained (its logs show how it
    failed), a checkpoint, or a pre-flight report (``preflight.json`` says why the pre-flight refused)."""
    if root is None or not os.path.isdir(root):
        return
    if trainer is not None and int(getattr(trainer, "global_step", 0) or 0) > 0:
        return
    if any(p.is_file() and p.name not in ("config.yaml", "hparams.yaml") for p in Path(root).rglob("*")):
        return
    import shutil

    shutil.rmtree(root, ignore_errors=True)


def parse_config(argv: list[str], *, datamodule_class=None):
    """The parsed (not instantiated) config of ``mmlm fit ARGV``; bad options exit with code 2."""
    return make_cli(argv, datamodule_class=datamodule_class, parse_only=True)


def main(argv: list[str] | None = None, *, datamodule_class=None) -> int:
    """``mmlm fit ARGV``; returns the exit code."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from mmlm.data.errors import DataErrorBudgetExceeded
    from mmlm.training.callbacks import NonFiniteLossError, TrainingInterrupted
    from mmlm.training.preflight import PreflightError

    try:
        import torch

        if torch.cuda.is_available():
            torch.set_float32_matmul_precision("high")
        make_cli(argv, datamodule_class=datamodule_class)
    except SIGTERMException:  # before training starts (set-up, sanity check): Lightning's own handler
        print("interrupted by SIGTERM before a checkpoint could be saved", file=sys.stderr)
        return 128 + 15
    except SystemExit as e:  # --help, parse errors
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    except TrainingInterrupted as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except (NonFiniteLossError, PreflightError, DataErrorBudgetExceeded) as e:
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, NotADirectoryError, ImportError, MisconfigurationException) as e:
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # during the run (disk full, a file system gone read-only): no traceback
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


def error_message(exc: BaseException) -> str:
    """``exc``'s message. An exception raised in a DataLoader worker (a data error budget, a bad shard)
    reaches the main process re-raised by torch with the worker's traceback in its message ("Caught X in
    DataLoader worker process N. Original Traceback ..."): that gives the original message alone."""
    msg = str(exc)
    if not (msg.startswith("Caught ") and "\nOriginal Traceback" in msg):
        return msg
    cls = type(exc)
    for name in (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__qualname__}: "):
        i = msg.rfind("\n" + name)
        if i >= 0:
            return msg[i + 1 + len(name):].strip()
    return msg.strip().splitlines()[-1]


def add_parser(sub) -> None:
    """``mmlm --help`` lists ``fit``; its own options are parsed by LightningCLI (``mmlm fit --help``)."""
    p = sub.add_parser("fit", help="train a model from a YAML recipe (LightningCLI; `mmlm fit --help`)",
                       description=FIT_DESCRIPTION, add_help=False)
    p.set_defaults(run=lambda args: main(["--help"]))


if __name__ == "__main__":
    sys.exit(main())
