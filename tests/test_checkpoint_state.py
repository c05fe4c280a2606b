"""mmlm.training.state: the RNG states survive a weights-only checkpoint and replay the same draws."""

import io
import random

import numpy as np
import torch

from mmlm.training.state import CHECKPOINT_KEY, get_rng_state, make_payload, read_checkpoint_payload, set_rng_state


def _draws():
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_rng_state_round_trip_through_a_weights_only_checkpoint():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    _draws()
    buf = io.BytesIO()
    torch.save({"rng": get_rng_state()}, buf)
    expected = [_draws() for _ in range(3)]
    _draws()  # move every generator on
    buf.seek(0)
    set_rng_state(torch.load(buf, weights_only=True)["rng"])
    assert [_draws() for _ in range(3)] == expected


def test_set_rng_state_leaves_missing_generators_alone():
    torch.manual_seed(0)
    state = {k: v for k, v in get_rng_state().items() if k == "torch"}
    random.seed(5)
    expected_python = random.Random(5).random()
    set_rng_state(state)
    assert random.random() == expected_python


def test_payload_is_read_back_from_a_checkpoint_file(tmp_path):
    payload = make_payload({"a": 1}, {"tokenizer.json": b"{}"}, {"skipped": 2})
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(3)}, CHECKPOINT_KEY: payload}, path)
    back = read_checkpoint_payload(str(path))
    assert back["model_config"] == {"a": 1} and back["processor"] == {"tokenizer.json": b"{}"}
    assert back["nonfinite"] == {"skipped": 2} and back["version"] == payload["version"]
    assert read_checkpoint_payload(_without_payload(tmp_path)) is None


def _without_payload(tmp_path):
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}}, path)
    return str(path)
