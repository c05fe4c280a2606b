"""The notebook-level API: ``load`` a checkpoint and ``describe`` images with it.

``describe(images, model=DIR_or_(vlm, processor), prompt=None)`` returns one text per image,
batched and KV-cached, with the prompt format saved in the checkpoint (``prompt=None`` asks
for a caption with the checkpoint's caption prompt). ``on_text(row, delta)`` streams text
as it is generated: the raw decoded pieces, a stop string and surrounding whitespace included
(``mmlm.inference.StreamPrinter`` shows exactly the returned text; beam search streams nothing).
Images are PIL images or paths (EXIF orientation applied, RGB).

``load`` casts the weights to ``dtype`` but keeps the rotary frequencies float32 (as transformers
does) and refuses a processor whose image tokens are not the model's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageOps

from mmlm.generation import GenerationConfig, generate


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto``/None: the GPU when there is one, else the CPU; a CUDA/MPS device that is not here is a
    ``ValueError``."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{device}: CUDA is not available here (use cpu)")
        if (dev.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"{device}: there are only {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{device}: MPS (Apple GPU) is not available here (use cpu)")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto``/None: bf16 on a GPU that supports it, else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; known: auto, {', '.join(names)}")
    return names[dtype]


def cast_model(vlm, dtype: torch.dtype):
    """``vlm`` cast to ``dtype`` in place (returned), keeping the rotary frequencies float32
    (``mmlm.modeling.vlm.FLOAT32_BUFFERS``)."""
    from mmlm.modeling.vlm import float32_buffers, restore_float32_buffers

    keep = float32_buffers(vlm)
    vlm.to(dtype=dtype)
    restore_float32_buffers(vlm, keep)
    return vlm


def check_pair(vlm, processor, where: str | Path = "") -> None:
    """A ``ValueError`` naming ``where`` when the processor's image tokens do not match the model's (a
    processor_config.json from another model): every image would fail later with a per-sample count error."""
    from mmlm.processing import check_vocabulary

    at = f"{where}: " if where else ""
    try:
        check_vocabulary(vlm, processor.tokenizer)
    except ValueError as e:
        raise ValueError(f"{at}{e}") from None
    if processor.config.num_image_tokens != vlm.num_image_tokens:
        raise ValueError(f"{at}the processor expands <image> to {processor.config.num_image_tokens} tokens but the "
                         f"model makes {vlm.num_image_tokens} per image: processor_config.json is not this model's")
    if processor.image_token_id != vlm.config.image_token_id:
        raise ValueError(f"{at}the tokenizer's <image> id is {processor.image_token_id} but the model's "
                         f"image_token_id is {vlm.config.image_token_id}: the tokenizer is not this model's")


def model_pair(model) -> tuple:
    """``model`` checked to be a ``(VLM, Processor)`` pair that belong together (``check_pair``)."""
    from mmlm.modeling.vlm import VLM
    from mmlm.processing import Processor

    if not (isinstance(model, (tuple, list)) and len(model) == 2 and isinstance(model[0], VLM)
            and isinstance(model[1], Processor)):
        raise TypeError(f"model= must be a checkpoint directory or a (VLM, Processor) pair, got "
                        f"{type(model).__name__}" + (" (pass (vlm, processor))" if isinstance(model, VLM) else ""))
    check_pair(model[0], model[1])
    return model[0], model[1]


def load(path: str | Path, device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = "auto"):
    """``(VLM, Processor)`` from a checkpoint directory, in eval mode on ``device``, in ``dtype`` (rotary
    frequencies stay float32, as transformers keeps them). A processor that does not match the model
    (image tokens) is a ``ValueError``."""
    from mmlm.checkpoint import load_vlm
    from mmlm.processing import Processor

    dev = resolve_device(device)
    vlm = load_vlm(path)  # on the CPU in float32; cast before the move, so the device never holds float32 weights
    cast_model(vlm, resolve_dtype(dtype, dev)).to(dev)
    processor = Processor.from_pretrained(path)
    check_pair(vlm, processor, path)
    return vlm, processor


def open_image(source) -> Image.Image:
    """A path, binary file, PIL image or numpy array -> an RGB PIL image exactly as training decodes one: EXIF
    orientation applied (files), then :func:`mmlm.data.decode.to_rgb` (alpha composited on white,
    16-bit and float images scaled to 8 bits; a plain ``convert("RGB")`` would turn a 16-bit
    grayscale PNG white and show whatever colour transparent pixels store). Any format PIL reads."""
    from mmlm.data.decode import to_rgb

    if isinstance(source, Image.Image):  # one opened by the caller: its EXIF orientation too, as a file's
        return to_rgb(ImageOps.exif_transpose(source))
    if type(source).__module__ == "numpy":  # (H, W) or (H, W, 3|4) uint8, as PIL reads arrays
        return to_rgb(Image.fromarray(source))
    if isinstance(source, torch.Tensor):
        raise TypeError("an image tensor is ambiguous (layout, scale): pass a path, a PIL image or an (H, W, 3) "
                        "uint8 array (torchvision.transforms.functional.to_pil_image converts a tensor)")
    with Image.open(source) as im:
        return to_rgb(ImageOps.exif_transpose(im))


class TextStream:
    """Turns per-step token ids into text deltas per row (decoding whole prefixes, so
    multi-byte characters split across tokens come out whole)."""

    def __init__(self, processor, batch: int, on_text: Callable[[int, str], None]):
        self.processor = processor
        self.on_text = on_text
        self.ids: list[list[int]] = [[] for _ in range(batch)]
        self.sent = [""] * batch
        self.done = [False] * batch
        self.stop_ids = set(processor.stop_token_ids)

    def __call__(self, next_ids: torch.Tensor) -> None:
        for row, tok in enumerate(next_ids.tolist()):
            if self.done[row]:
                continue
            if tok in self.stop_ids:
                self.done[row] = True
                continue
            self.ids[row].append(tok)
            text = self.processor.tokenizer.decode(self.ids[row], skip_special_tokens=True)
            if text.endswith("\ufffd"):
                continue  # an incomplete multi-byte character: wait for the rest
            if text.startswith(self.sent[row]) and len(text) > len(self.sent[row]):
                self.on_text(row, text[len(self.sent[row]):])
                self.sent[row] = text


def stop_on_strings(processor, stop_strings: Sequence[str]):
    """A ``stop`` callback for ``generate``: True for rows whose text contains a stop string."""
    def stop(generated: torch.Tensor) -> torch.Tensor:
        texts = processor.tokenizer.batch_decode(generated, skip_special_tokens=True)
        return torch.tensor([any(s in t for s in stop_strings) for t in texts], device=generated.device)
    return stop


def trim_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` cut before the first stop string, stripped."""
    for s in stop_strings:
        if s in text:
            text = text[: text.index(s)]
    return text.strip()


def generate_texts(vlm, processor, images: Sequence, prompts: Sequence[str | None],
                   config: GenerationConfig, stop_strings: Sequence[str] = (),
                   on_text: Callable[[int, str], None] | None = None,
                   seed_keys: Sequence[int | str] | None = None) -> list[str]:
    """One batch: images (one PIL image or a list per sample) + prompts -> texts. ``seed_keys``: what
    each sample is known by for its sampling seed (``mmlm.generation.sample_seed``; default: its row)."""
    if isinstance(stop_strings, str):  # one stop string, not its characters
        stop_strings = (stop_strings,)
    if any(not s for s in stop_strings):  # "" is in every text: every reply would be empty
        raise ValueError("stop strings must not be empty")
    batch = processor.prompt_inputs(images, prompts)
    streamer = TextStream(processor, len(prompts), on_text) if on_text else None
    new = generate(
        vlm, batch["input_ids"], batch["pixel_values"], batch["attention_mask"], num_images=batch["num_images"],
        config=config, eos_token_id=processor.stop_token_ids, pad_token_id=processor.tokenizer.pad_token_id,
        stop=stop_on_strings(processor, stop_strings) if stop_strings else None, on_tokens=streamer,
        seed_keys=seed_keys,
    )
    return [trim_at_stop(processor.decode(row), stop_strings) for row in new.tolist()]


def _one_image(x) -> bool:
    """``x`` is one image (a path, PIL image, array, tensor or binary file), not a sequence of them."""
    return (isinstance(x, (str, os.PathLike, Image.Image, torch.Tensor)) or type(x).__module__ == "numpy"
            or hasattr(x, "read"))


def describe(images: Sequence[str | Path | Image.Image] | str | Path | Image.Image, model=None,
             prompt: str | Sequence[str | None] | None = None, *, batch_size: int = 16,
             device: str | None = "auto", dtype: str | None = "auto", stop_strings: Sequence[str] = (),
             on_text: Callable[[int, str], None] | None = None, progress: bool = False,
             config: GenerationConfig | None = None, **generation) -> list[str]:
    """Describe (or answer ``prompt`` about) each image; returns one text per image.

    ``images``: paths, binary files or PIL images; an entry that is a list or tuple holds several images
    for one prompt (its ``<image>`` placeholders, one per image, place them; without any, they go before
    the prompt). ``model``: a checkpoint directory or a ``(vlm, processor)`` pair. ``prompt``: one for all
    images or one per image (None: the checkpoint's caption prompt). ``generation``: the
    fields of ``GenerationConfig`` (``max_new_tokens``, ``do_sample``, ``num_beams``, ``seed``, ...), or
    ``config=`` a ``GenerationConfig``; with a
    ``seed``, an image given by its path samples as ``mmlm describe PATH --seed`` does, whatever its place.
    """
    if model is None:
        raise ValueError("describe needs model= (a checkpoint directory or a (vlm, processor) pair)")
    if isinstance(model, (str, Path)):
        vlm, processor = load(model, device, dtype)
    else:
        vlm, processor = model_pair(model)
    if _one_image(images):  # not a sequence of images (an array would be read row by row, a file line by line)
        images = [images]
    images = list(images)
    prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt] * len(images)
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if config is not None and generation:
        raise ValueError("pass either config= or generation options, not both")
    config = config or GenerationConfig(**generation)
    texts: list[str] = []
    starts = range(0, len(images), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, total=len(starts), unit="batch", desc="describe")
    for start in starts:
        chunk = [[open_image(x) for x in im] if isinstance(im, (list, tuple)) else open_image(im)
                 for im in images[start:start + batch_size]]
        cb = (lambda row, delta, _s=start: on_text(_s + row, delta)) if on_text else None
        # sampling seeds by the image's path (as the CLI), else its index: the same at any batch_size
        keys = [os.fspath(im) if isinstance(im, (str, os.PathLike)) else i
                for i, im in enumerate(images[start:start + batch_size], start)]
        texts += generate_texts(vlm, processor, chunk, prompts[start:start + batch_size], config, stop_strings, cb,
                                seed_keys=keys)
    return texts
