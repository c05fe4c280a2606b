"""Model FLOPs utilisation (MFU) of the ``small`` preset's training step on a CUDA GPU, in bf16.

MFU = model FLOPs per second of the training step / the bf16 matmul peak measured in the same run.

- Peak: a large bf16 ``torch.matmul`` (``--peak-n`` square, default 8192) in a loop, 2 n^3 FLOPs
  each, after warm-up; the best of a few timed loops (the GPU's achievable dense bf16 rate, e.g.
  ~795 TFLOP/s measured on an H100 vs its 989 datasheet number).
- Model FLOPs of one step: counted by ``torch.utils.flop_counter.FlopCounterMode`` over one
  forward + backward of the real model (matmuls, convolutions, attention kernels: what the
  hardware must do, attention counted in full over each row) -- no hand formula to get wrong.
- Step: ``VLM.from_preset(preset)`` (random weights; the LM keeps its real vocabulary, the
  tokenizer is not needed for this), bf16 autocast as ``precision=bf16-mixed`` (fp32 master
  weights), mmlm's AdamW (fused on CUDA), gradient clipping 1.0; ``--batch-size`` rows of
  ``--seq-len`` tokens, each row one image (its tokens first) then text, on the GPU already:
  data loading is excluded (``benchmarks/loader.py`` measures it). Steady state over ``--steps``.

Reference (ANCHORS.md): nanoVLM's plain loop ~2-8% MFU; LLM trainers on H100 33-48%. Those figures
are over the GPU's datasheet dense bf16 peak (H100 SXM / H200: 989 TFLOP/s), which no matmul reaches
(~795 measured): the script therefore also prints ``MFU datasheet`` (the same FLOPs over the
datasheet peak of a GPU it knows, :data:`DATASHEET_BF16_TFLOPS`), the figure to set against them.

On a machine without CUDA it prints "needs a CUDA device" and exits 0.

Usage::

    python benchmarks/mfu.py                                # small preset, batch 16 x 1024 tokens
    python benchmarks/mfu.py --batch-size 32 --seq-len 2048 --steps 20
    python benchmarks/mfu.py --compile                       # regional torch.compile, as --model.compile true
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import _common as C


# dense (no sparsity) bf16 tensor-core peaks from the vendor's datasheets, TFLOP/s; the first match in
# the GPU's name wins (so the PCIe / NVL variants come before the plain name)
DATASHEET_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.4), ("H200", 989.4),
                         ("H100", 989.4), ("A100", 312.0))


def datasheet_peak(gpu_name: str | None) -> float | None:
    """The datasheet dense bf16 peak in FLOP/s of ``gpu_name`` (``torch.cuda.get_device_name``), or None."""
    for key, tflops in DATASHEET_BF16_TFLOPS:
        if gpu_name and key.lower() in gpu_name.lower():
            return tflops * 1e12
    return None


def matmul_peak(device: str, n: int, dtype, loops: int = 3, iters: int = 20) -> dict:
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    rates = []
    for _ in range(loops):
        C_sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b)
        C_sync(device)
        rates.append(2 * n ** 3 * iters / (time.perf_counter() - t0))
    del a, b
    return {"n": n, "dtype": str(dtype), "flops_per_s": max(rates), "all": rates}


def C_sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def gqa_flop_formulas() -> dict:
    """FLOP formulas for SDPA with grouped-query shapes (fewer K/V heads than query heads).

    torch < 2.12's formulas reject such shapes (``sdpa_flop_count: query/key/value shapes are
    incompatible``); the kernel computes as if K/V were repeated to the query's heads, so count
    them that way. Shapes that already match pass through unchanged."""
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten

    def widen(q, kv):  # (B, Hkv, S, D) -> (B, Hq, S, D)
        return (kv[0], q[1], *kv[2:])

    def fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query_shape, widen(query_shape, key_shape), widen(query_shape, value_shape))

    def bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, widen(query_shape, key_shape),
                                           widen(query_shape, value_shape))

    names = ["_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"]
    out = {}
    for name in names:
        for suffix, fn in (("", fwd), ("_backward", bwd)):
            op = getattr(aten, name + suffix, None)
            if op is not None:
                out[op] = fn
    return out


def make_batch(vlm, batch: int, seq_len: int, device: str, vocab_hi: int):
    """Rows of one image (placeholders first) + random text, labels on the text."""
    import torch

    n_img = vlm.num_image_tokens
    if seq_len <= n_img + 2:
        raise SystemExit(f"error: --seq-len must exceed the {n_img} image tokens + 2")
    image_id = vlm.config.image_token_id
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, vocab_hi, (batch, seq_len - n_img), generator=g)
    text[text == image_id] = (image_id + 1) % vocab_hi
    ids = torch.cat([torch.full((batch, n_img), image_id), text], dim=1)
    labels = ids.clone()
    labels[:, :n_img] = -100
    size = vlm.image_transform().size
    return {"input_ids": ids.to(device), "labels": labels.to(device),
            "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": torch.randn(batch, 3, size, size, generator=g).to(device),
            "num_images": torch.ones(batch, dtype=torch.long).to(device)}


def main(argv=None) -> int:
    p = C.script_parser(__doc__)
    p.add_argument("--preset", default="small", type=C.preset_name, help="model preset, random weights (default small)")
    p.add_argument("--batch-size", type=C.positive_int, default=16, help="rows per step (default 16)")
    p.add_argument("--seq-len", type=C.positive_int, default=1024,
                   help="tokens per row, image tokens included (default 1024)")
    p.add_argument("--steps", type=C.positive_int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=C.positive_int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--peak-n", type=C.positive_int, default=8192, help="matrix side of the matmul peak (default 8192)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each LM layer and vision block first, as VLMModule(compile=True)")
    p.add_argument("--force-cpu", action="store_true", help=argparse.SUPPRESS)  # exercise the code on a CPU
    C.add_common_args(p, threads=0)
    args = p.parse_args(argv)
    C.set_threads(args.threads)

    import torch

    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    if device != "cuda" and not args.force_cpu:
        print("mfu.py needs a CUDA device (bf16 matmul peak and a GPU training step); none here: nothing measured.")
        return 0
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    from torch.utils.flop_counter import FlopCounterMode

    from mmlm import VLM
    from mmlm.processing import IMAGE_TOKEN
    from mmlm.training.compile import compile_blocks
    from mmlm.training.optim import build_optimizer

    info = C.system_info(device)
    info["load_at_start"] = C.machine_load()
    peak = matmul_peak(device, args.peak_n, torch.bfloat16)
    print(f"bf16 matmul peak ({args.peak_n}^3): {peak['flops_per_s'] / 1e12:.1f} TFLOP/s on {info['device']}",
          flush=True)

    syn = C.synthetic_dataset(args.cache_dir)
    tok = C.bench_tokenizer(syn)
    torch.manual_seed(0)
    vlm = VLM.from_preset(args.preset, image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                          **C.offline_overrides(args.preset)).to(device).train()
    vocab = vlm.lm.get_input_embeddings().num_embeddings
    batch = make_batch(vlm, args.batch_size, args.seq_len, device, vocab)
    opt = build_optimizer(vlm, lr=1e-4, weight_decay=0.01)
    params = [p for p in vlm.parameters() if p.requires_grad]

    def fwd_bwd():
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = vlm(**batch, return_logits=False).loss  # as VLMModule.training_step
        loss.backward()
        return loss

    def step():
        loss = fwd_bwd()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    # Count on the eager model, before any compile: compiled blocks run under a dispatch mode such
    # as the counter's only by recompiling (measured: the timed steps then ran no faster than eager).
    counter = FlopCounterMode(display=False, custom_mapping=gqa_flop_formulas())
    with counter:
        fwd_bwd()
    opt.zero_grad(set_to_none=True)
    flops_step = counter.get_total_flops()
    if args.compile:
        compile_blocks(vlm)  # as VLMModule(compile=True): each LM layer and vision block
    for _ in range(args.warmup):
        step()
    C_sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step().detach()
        C_sync(device)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    achieved = flops_step / step_s
    mfu = achieved / peak["flops_per_s"]
    sheet = datasheet_peak(info.get("gpu"))
    mfu_sheet = achieved / sheet if sheet else None
    tokens = args.batch_size * args.seq_len
    info["load_at_end"] = C.machine_load()
    C.print_table([{"preset": args.preset, "params M": vlm.num_parameters() / 1e6, "batch": f"{args.batch_size}x"
                    f"{args.seq_len}", "step ms": 1000 * step_s, "tokens/s": tokens / step_s,
                    "model TFLOP/step": flops_step / 1e12, "achieved TFLOP/s": achieved / 1e12,
                    "peak TFLOP/s": peak["flops_per_s"] / 1e12, "MFU": mfu, "MFU datasheet": mfu_sheet}],
                  ["preset", "params M", "batch", "step ms", "tokens/s", "model TFLOP/step", "achieved TFLOP/s",
                   "peak TFLOP/s", "MFU", "MFU datasheet"],
                  title="training-step MFU (bf16 autocast, data on device; MFU: over the measured matmul peak, "
                        "MFU datasheet: over the GPU's datasheet peak, as the reference figures)")
    payload = {
        "config": {"preset": args.preset, "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
                   "warmup": args.warmup, "compile": args.compile, "parameters": vlm.num_parameters(),
                   "image_tokens": vlm.num_image_tokens, "vocab": vocab},
        "reference": {"nanovlm_plain_loop_mfu": [0.02, 0.08], "llm_trainers_h100_mfu": [0.33, 0.48]},
        "results": {"matmul_peak": peak, "model_flops_per_step": flops_step, "step_seconds": times,
                    "step_seconds_median": step_s, "tokens_per_s": tokens / step_s, "achieved_flops_per_s": achieved,
                    "peak_memory_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None},
        "datasheet_bf16_flops_per_s": sheet,
        "ratios": {"mfu": mfu, "mfu_vs_datasheet_peak": mfu_sheet},
    }
    if not args.no_save:
        C.write_result("mfu", payload, info, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
