"""benchmarks/token_probe.py: linear probes on image tokens read what the tokens carry."""

import importlib.util
import json
from pathlib import Path

import torch

from mmlm import VLM


def _load_probe():
    spec = importlib.util.spec_from_file_location("token_probe", Path(__file__).parent.parent / "benchmarks/token_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_probes_read_a_position_embedding_and_not_noise(tmp_path, capsys):
    from data_pipelines.synthetic import build

    build(tmp_path / "data", train=120, val=0, test=30, shard_size=60, workers=1, show_progress=False)
    torch.manual_seed(0)
    placed = VLM.from_preset("tiny", image_token_id=5, projector={"position_embedding": True})
    with torch.no_grad():  # each cell's vector far larger than the random projector's output
        placed.projector.position_embedding.copy_(torch.randn_like(placed.projector.position_embedding) * 10)
    placed.save_pretrained(tmp_path / "placed")
    probe = _load_probe()
    assert probe.main(["--data", str(tmp_path / "data"), str(tmp_path / "placed"), "--no-save"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert row["position_embedding"] is True and row["cell"] == 100.0
    # random labels are read at about chance (20%), a linear function of the features almost always
    x = torch.randn(400, 16)
    y = torch.randint(0, 5, (400,))
    assert probe.linear_probe(x[:300], y[:300], x[300:], y[300:], classes=5) < 0.4
    assert probe.linear_probe(x[:300], x[:300, 0].gt(0).long(), x[300:], x[300:, 0].gt(0).long(), classes=2) > 0.95
