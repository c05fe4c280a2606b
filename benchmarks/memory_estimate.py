"""Pre-flight memory estimate vs the memory a training step really takes, side by side.

``mmlm fit`` prints, before the first step, an estimate of the memory a training step needs
(``mmlm.training.preflight.estimate_memory``: weights + gradients + AdamW states + autocast copies +
activations + logits). This script trains a few steps of each case in its own subprocess and sets the
measured peak next to the estimate for the same model, batch and precision:

``tiny-full``       the ``tiny`` preset, everything trains (timm ViT + projector + LM);
``tiny-instruct``   vision frozen (stage ``instruct``);
``tiny-lora``       stage ``instruct`` with LoRA (r 16, dropout 0.05, all linear layers; needs peft);
``clip-full``       the ``tiny`` LM with a transformers CLIP vision tower (random weights, width 256,
                    6 layers, 192 px / 16 px patches) that trains too;
``small-instruct``  the ``small`` preset's shapes (random weights), stage ``instruct``: not in the default
                    list (about 10 GB and minutes on a CPU).

A step is what ``VLMModule.training_step`` runs: ``vlm(..., return_logits=False)`` (the output layer on
the labelled positions only, where the LM allows it), ``backward``, ``AdamW.step``,
``zero_grad(set_to_none=True)``; on CUDA with ``--precision bf16-mixed`` under autocast. The batch is
``--batch-size`` rows of ``--seq-len`` tokens, one image per row, the text after the image supervised.

Measured: on CUDA ``torch.cuda.max_memory_allocated`` (everything allocated from before the model is
built); on CPU the peak resident set (``VmHWM``, reset before the model is built) minus the resident set
at that point, with glibc returning freed memory at once (``_memory.MALLOC_ENV``): it includes what the
CPU runtime adds (autograd's temporaries in the backward pass, kernels' scratch buffers), which the
estimate does not model. ``measured / estimate`` above 1 is what the estimate leaves out.

Usage::

    python benchmarks/memory_estimate.py                       # the four default cases on this device
    python benchmarks/memory_estimate.py --cases small-instruct --batch-size 4 --seq-len 1024 --device cuda \\
        --precision bf16-mixed
"""

from __future__ import annotations

import gc
import json
import sys
import tempfile
from pathlib import Path

import _common as C  # noqa: E402  (puts the repository root on sys.path)
import _memory as M

CASES = {
    "tiny-full": {"preset": "tiny", "stage": "full"},
    "tiny-instruct": {"preset": "tiny", "stage": "instruct"},
    "tiny-lora": {"preset": "tiny", "stage": "instruct", "lora": {"r": 16, "lora_dropout": 0.05}},
    "clip-full": {"preset": "tiny", "stage": "full", "clip": {"hidden_size": 256, "intermediate_size": 1024,
                                                              "num_hidden_layers": 6, "num_attention_heads": 4,
                                                              "image_size": 192, "patch_size": 16}},
    "small-instruct": {"preset": "small", "stage": "instruct"},
}
DEFAULT_CASES = ("tiny-full", "tiny-instruct", "tiny-lora", "clip-full")
IMAGE_TOKEN_ID = 3


def build_model(case: dict, vocab: int, workdir: Path):
    """A random-weight VLM of ``case`` (stage and LoRA applied)."""
    import torch

    from mmlm import VLM
    from mmlm.config import VisionConfig
    from mmlm.training.freeze import configure_trainable

    torch.manual_seed(0)
    overrides = {"text": {**C.offline_overrides(case["preset"]).get("text", {}), "hf_config": {"vocab_size": vocab}}}
    if "clip" in case:
        from transformers import CLIPVisionConfig, CLIPVisionModel

        path = workdir / "clip"
        CLIPVisionModel(CLIPVisionConfig(**case["clip"])).save_pretrained(str(path))
        overrides["vision"] = VisionConfig(backend="hf", name=str(path), pretrained=False, drop_prefix_tokens=True)
    vlm = VLM.from_preset(case["preset"], image_token_id=IMAGE_TOKEN_ID, **overrides)
    configure_trainable(vlm, case["stage"], case.get("lora"))
    return vlm


def make_batch(vlm, batch_size: int, seq_len: int, vocab: int, device: str) -> dict:
    import torch

    n = vlm.num_image_tokens
    if seq_len <= n + 16:
        raise SystemExit(f"error: --seq-len {seq_len} cannot hold an image ({n} tokens) and some text")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(IMAGE_TOKEN_ID + 1, vocab, (batch_size, seq_len), generator=g)
    ids[:, 1:1 + n] = IMAGE_TOKEN_ID
    labels = ids.clone()
    labels[:, :1 + n + 8] = -100  # the prompt and the image: unsupervised
    size = vlm.vision.image_transform().size
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "pixel_values": torch.randn(batch_size, 3, size, size, generator=g)}
    return {k: v.to(device) for k, v in batch.items()}


def child(args) -> int:
    """The ``--child CASE`` process: train a few steps, print the peak and the estimate as ``MEMORY {json}``."""
    import torch

    from mmlm.modeling.vlm import labelled_loss_parts
    from mmlm.training.preflight import estimate_memory

    C.set_threads(args.threads)
    device = C.resolve_device(args.device)
    case = CASES[args.child]
    torch.ones(64, 64) @ torch.ones(64, 64)  # the runtime's first-call allocations before the mark
    with tempfile.TemporaryDirectory() as tmp:
        gc.collect()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            method = "torch.cuda.max_memory_allocated from before the model is built"
        else:
            base = (M._status_kb("VmRSS") or 0) * 1024
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            method = "peak VmHWM - VmRSS before the model is built (glibc: " + \
                     " ".join(f"{k}={v}" for k, v in M.MALLOC_ENV.items()) + ")"
        vlm = build_model(case, args.vocab, Path(tmp)).to(device).train()
        batch = make_batch(vlm, args.batch_size, args.seq_len, args.vocab, device)
        opt = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=1e-5)
        autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")
        for _ in range(args.steps):
            with autocast:
                loss = vlm(**batch, return_logits=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = (M._status_kb("VmHWM") or 0) * 1024
        labelled = labelled_loss_parts(vlm.lm) is not None
        est = estimate_memory(vlm, batch_size=args.batch_size, seq_len=args.seq_len, num_images=args.batch_size,
                              precision=args.precision,
                              logit_tokens=int((batch["labels"] != -100).sum()) if labelled else None)
    print("MEMORY " + json.dumps({"mode": args.child, "measured_bytes": peak - base, "method": method,
                                  "estimate": {k: v for k, v in est.items() if not k.endswith("_gib")},
                                  "loss": float(loss)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = C.script_parser(__doc__)
    p.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), choices=sorted(CASES),
                   help=f"cases to run (default: {' '.join(DEFAULT_CASES)})")
    p.add_argument("--batch-size", type=C.positive_int, default=8, help="rows per batch (default 8)")
    p.add_argument("--seq-len", type=C.positive_int, default=256, help="tokens per row (default 256)")
    p.add_argument("--vocab", type=C.positive_int, default=8192,
                   help="the LM's vocabulary (default 8192; the logits term grows with it)")
    p.add_argument("--steps", type=C.positive_int, default=3, help="training steps per case (default 3)")
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"],
                   help="32-true, or bf16-mixed (autocast; CUDA) (default 32-true)")
    p.add_argument("--timeout", type=C.positive_float, default=900, help="seconds per case (default 900)")
    p.add_argument("--child", choices=sorted(CASES), help=None)
    C.add_common_args(p, threads=0)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    device = C.resolve_device(args.device)
    if args.precision == "bf16-mixed" and device != "cuda":
        p.error("--precision bf16-mixed needs --device cuda (CPU autocast keeps other copies)")
    info = C.system_info(device)
    rows = []
    for name in args.cases:
        cmd = [str(Path(__file__).resolve()), "--child", name, "--device", device, "--batch-size", str(args.batch_size),
               "--seq-len", str(args.seq_len), "--vocab", str(args.vocab), "--steps", str(args.steps),
               "--precision", args.precision, "--threads", str(args.threads)]
        r = M.measure_memory(cmd, name=name, timeout=args.timeout)
        est = r["estimate"]
        rows.append({"case": name, "estimate GiB": est["total"] / 2**30, "measured GiB": r["measured_bytes"] / 2**30,
                     "measured / estimate": r["measured_bytes"] / est["total"],
                     "weights+grads+AdamW GiB": (est["weights"] + est["grads"] + est["optimizer"]) / 2**30,
                     "activations GiB": est["activations"] / 2**30, "logits GiB": est["logits"] / 2**30,
                     "method": r["method"]})
        print(f"{name}: estimate {rows[-1]['estimate GiB']:.3f} GiB, measured {rows[-1]['measured GiB']:.3f} GiB",
              file=sys.stderr, flush=True)
    C.print_table(rows, ["case", "estimate GiB", "measured GiB", "measured / estimate", "weights+grads+AdamW GiB",
                         "activations GiB", "logits GiB"],
                  title=f"pre-flight estimate vs measured peak ({device}, batch {args.batch_size} x {args.seq_len} "
                        f"tokens, vocab {args.vocab}, {args.precision})")
    print(f"\nmeasured: {rows[0]['method']}" if rows else "")
    if not args.no_save:
        C.write_result("memory_estimate", {"args": {k: (str(v) if isinstance(v, Path) else v)
                                                    for k, v in vars(args).items() if k != "child"},
                                           "rows": rows}, info, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
