"""Every recipe in configs/ parses through the `mmlm fit` parser (LightningCLI + VLMModule + VLMDataModule)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmlm.cli.fit import parse_config
from mmlm.presets import PRESETS

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_the_recipes_are_there():
    names = {p.stem for p in CONFIGS}
    assert {"tiny-cpu", "tiny-cpu-vqa", "align-small", "instruct-small", "align-base", "instruct-base",
            "align-llava-1.5-7b", "instruct-llava-1.5-7b"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_parses(path):
    cfg = parse_config(["--config", str(path)]).fit
    assert cfg.trainer.max_steps > 0, "the schedule needs trainer.max_steps"
    assert cfg.model.stage in ("align", "instruct", "full")
    assert cfg.model.init_from or cfg.model.preset in PRESETS
    assert cfg.data.train, "a recipe names its training shards"
    assert cfg.trainer.default_root_dir == str(Path("runs") / path.stem)  # the run dir follows the config name
    assert cfg.checkpoint.dirpath == str(Path("runs") / path.stem / "checkpoints")


def test_a_later_stage_starts_from_the_model_of_a_recipe_here():
    stems = {p.stem for p in CONFIGS}
    later = 0
    for path in CONFIGS:
        init = parse_config(["--config", str(path)]).fit.model.init_from
        if init:
            later += 1
            run, stage1, model = Path(init).parts
            assert (run, model) == ("runs", "model") and stage1 in stems and stage1 != path.stem, init
    assert later >= 7  # instruct-*, tiny-cpu-vqa, tiny-cpu-color, tiny-cpu-where, tiny-cpu-review


def test_llava_recipe_values():
    """LLaVA-1.5: align lr 1e-3 at global batch 256, instruct lr 2e-5 at 128; cosine, 3% warmup, bf16."""
    for stem, lr, global_batch, stage in (("align-llava-1.5-7b", 1e-3, 256, "align"),
                                          ("instruct-llava-1.5-7b", 2e-5, 128, "instruct")):
        cfg = parse_config(["--config", str(next(p for p in CONFIGS if p.stem == stem))]).fit
        t = cfg.trainer
        assert (cfg.model.lr, cfg.model.stage, cfg.model.warmup, cfg.model.weight_decay) == (lr, stage, 0.03, 0.0)
        assert cfg.data.batch_size * t.accumulate_grad_batches * t.devices * t.num_nodes == global_batch
        assert t.precision == "bf16-mixed" and cfg.model.max_length == 2048


def test_command_line_overrides_a_config():
    cfg = parse_config(["--config", str(CONFIGS[0]), "--model.lr", "0.5", "--trainer.default_root_dir", "/tmp/x",
                        "--data.batch_size", "3"]).fit
    assert (cfg.model.lr, cfg.data.batch_size, cfg.checkpoint.dirpath) == (0.5, 3, "/tmp/x/checkpoints")


def test_the_quickstart_stages_start_from_one_another():
    from mmlm.quickstart import RECIPES

    assert all((Path(__file__).parent.parent / "configs" / name).is_file() for name in RECIPES)
    for prev, name in zip(RECIPES, RECIPES[1:]):
        init = parse_config(["--config", str(Path(__file__).parent.parent / "configs" / name)]).fit.model.init_from
        assert init == str(Path("runs") / Path(prev).stem / "model"), (name, init)


def test_model_overrides_flags_merge_into_the_recipes(tmp_path):
    """A ``--model.model_overrides`` flag adds to the recipe's overrides instead of silently replacing
    them (which would drop ``pretrained: true``); dotted and ``=`` forms; ``null`` clears; ``--model.lora``
    likewise; bad values: errors."""
    import pytest

    from mmlm.cli.fit import merge_dict_flags

    import yaml

    cfg = yaml.safe_load(next(p for p in CONFIGS if p.stem == "tiny-cpu").read_text())
    cfg["model"]["model_overrides"] = {"vision": {"pretrained": False, "depth": 1}, "text": {"pretrained": False}}
    cfg["model"]["lora"] = {"r": 16, "lora_alpha": 32}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    base = ["--config", str(recipe)]

    def overrides(*flags):
        return parse_config(base + list(flags)).fit.model.model_overrides

    assert overrides() == {"vision": {"pretrained": False, "depth": 1}, "text": {"pretrained": False}}
    assert overrides("--model.model_overrides", "{text: {attn_implementation: eager}}") == {
        "vision": {"pretrained": False, "depth": 1}, "text": {"pretrained": False, "attn_implementation": "eager"}}
    assert overrides("--model.model_overrides.vision.depth", "2", "--model.model_overrides.vision.image_transform="
                     "{resize_kernel: pil}") == {"vision": {"pretrained": False, "depth": 2,
                                                            "image_transform": {"resize_kernel": "pil"}},
                                                 "text": {"pretrained": False}}
    assert overrides("--model.model_overrides", "null", "--model.model_overrides", "{projector: {name: linear}}") == {
        "projector": {"name": "linear"}}
    assert overrides("--model.model_overrides", "null") is None
    lora = lambda *flags: parse_config(base + list(flags)).fit.model.lora  # noqa: E731
    assert lora() == {"r": 16, "lora_alpha": 32}
    assert lora("--model.lora.r", "8") == {"r": 8, "lora_alpha": 32}
    assert lora("--model.lora", "null") is None
    assert merge_dict_flags(["--model.lr", "0.1"]) == ["--model.lr", "0.1"]  # nothing to merge: untouched
    with pytest.raises(ValueError, match="takes a mapping"):
        merge_dict_flags(base + ["--model.model_overrides", "3"])
    with pytest.raises(ValueError, match="needs a value"):
        merge_dict_flags(base + ["--model.model_overrides"])
