"""What a model's image tokens carry: linear probes on the synthetic shapes dataset.

For each model (a ``save_pretrained`` directory whose processor emits one image token per cell of a
3x3 grid, as the ``tiny`` preset does on 72 px images), the image tokens the LM receives (projector
output, ``VLM.encode_images``) of the five cells where the synthetic scenes put objects (top, left,
center, right, bottom) are probed with a multinomial logistic regression (standardised features,
L-BFGS, a small L2 penalty) trained on ``--train-images`` training images and scored on the test
split's images. Probes: ``occupied`` (is an object in the cell), ``color`` / ``shape`` / ``size`` (of
the cell's object, occupied cells only) and ``cell`` (which of the five cells a token belongs to,
from the token alone: whether the LM can read a token's place without counting its offset).

A question like "where is the red star?" needs the place of the token it finds by content: with
``cell`` near chance (20%) the LM has to infer it from the token's offset under rotary positions.

Usage::

    python benchmarks/token_probe.py --data runs/qs/data runs/qs/tiny-cpu/model [MODEL ...]
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import (add_common_args, machine_load, print_table, script_parser, set_threads,  # noqa: E402
                     system_info, write_result)

CELLS = {"top": 1, "left": 3, "center": 4, "right": 5, "bottom": 7}  # place word -> token index (3x3, raster order)
PROBES = ("occupied", "color", "shape", "size", "cell")


def read_scenes(split_dir: Path, limit: int) -> tuple[list[np.ndarray], list[list[dict]]]:
    """Up to ``limit`` (image (H, W, 3) uint8, objects) of a synthetic split, in shard order."""
    from PIL import Image

    images, objects = [], []
    for shard in sorted(split_dir.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name, member in members.items():
                key = name[:-len(".json")]
                if not name.endswith(".json") or "_q" in key:  # image records only, not their questions
                    continue
                meta = json.loads(tar.extractfile(member).read())
                png = tar.extractfile(members[key + ".png"]).read()
                images.append(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
                objects.append(meta["objects"])
                if len(images) >= limit:
                    return images, objects
    if not images:
        raise SystemExit(f"error: no synthetic image records in {split_dir}")
    return images, objects


@torch.no_grad()
def image_tokens(vlm, images: list[np.ndarray], batch: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch):
        pixels = torch.from_numpy(np.stack(images[i:i + batch])).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)
        out.append(vlm.encode_images(pixels).float())  # (B, 9, D)
    tokens = torch.cat(out)
    if tokens.shape[1] != 9:
        raise SystemExit(f"error: the model gives {tokens.shape[1]} image tokens; the probes need one per cell of a 3x3 grid")
    return tokens


def probe_rows(tokens: torch.Tensor, objects: list[list[dict]], vocab: dict[str, list[str]]) -> dict:
    """Per probe: (features (M, D), labels (M,))."""
    xs: dict[str, list] = {p: [] for p in PROBES}
    ys: dict[str, list] = {p: [] for p in PROBES}
    places = list(CELLS.values())
    for toks, objs in zip(tokens, objects):
        by_cell = {CELLS[o["position"]]: o for o in objs}
        for cell in places:
            xs["occupied"].append(toks[cell])
            ys["occupied"].append(int(cell in by_cell))
            if cell in by_cell:
                for attr in ("color", "shape", "size"):
                    xs[attr].append(toks[cell])
                    ys[attr].append(vocab[attr].index(by_cell[cell][attr]))
                xs["cell"].append(toks[cell])
                ys["cell"].append(places.index(cell))
    return {p: (torch.stack(xs[p]), torch.tensor(ys[p])) for p in PROBES}


def linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                 classes: int, l2: float = 1e-3) -> float:
    """Test accuracy of a logistic regression fitted on the training rows."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    torch.manual_seed(0)
    head = torch.nn.Linear(x_train.shape[1], classes)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x_train), y_train) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (head(x_test).argmax(1) == y_test).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    p = script_parser(__doc__)
    p.add_argument("models", nargs="+", type=Path, help="save_pretrained model directories")
    p.add_argument("--data", type=Path, required=True,
                   help="a synthetic dataset directory (python -m data_pipelines.synthetic --out DIR): train/ and test/")
    p.add_argument("--train-images", type=int, default=3000, help="training images the probes fit on (default 3000)")
    p.add_argument("--test-images", type=int, default=500, help="test images they are scored on (default 500)")
    add_common_args(p, device=False, threads=0)
    args = p.parse_args(argv)
    set_threads(args.threads)
    from mmlm import VLM

    meta = json.loads((args.data / "synthetic.json").read_text())["vocabulary"]
    vocab = {"color": meta["colors"], "shape": meta["shapes"], "size": ["small", "large"]}
    classes = {"occupied": 2, "color": len(vocab["color"]), "shape": len(vocab["shape"]), "size": 2, "cell": len(CELLS)}
    train = read_scenes(args.data / "train", args.train_images)
    test = read_scenes(args.data / "test", args.test_images)
    rows, load_at_start = [], machine_load()
    for model in args.models:
        vlm = VLM.from_pretrained(model).eval()
        fit = probe_rows(image_tokens(vlm, train[0]), train[1], vocab)
        score = probe_rows(image_tokens(vlm, test[0]), test[1], vocab)
        row = {"model": str(model), "position_embedding": vlm.projector.position_embedding is not None}
        for name in PROBES:
            row[name] = round(100 * linear_probe(*fit[name], *score[name], classes[name]), 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print_table(rows, ["model", "position_embedding", *PROBES],
                title=f"linear-probe accuracy (%) of image tokens, {len(test[0])} test images (chance: cell 20)")
    if not args.no_save:
        write_result("token_probe", {"train_images": len(train[0]), "test_images": len(test[0]), "rows": rows},
                     {**system_info("cpu"), "load_at_start": load_at_start, "load_at_end": machine_load()}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
