"""Encoded samples -> training batches: right padding (:class:`PadCollate`) or packing (:class:`PackCollate`).

An encoded sample is what ``Processor.encode`` returns: ``input_ids (L,)``, ``labels (L,)``,
``pixel_values (n, 3, H, W) | None``, ``num_images`` (plus ``key``/``position``, ignored here).

Batch contract (both collates), a dict:

====================  =====================================================================
``input_ids``         (B, L) long; right padded with the tokenizer's pad id
``labels``            (B, L) long; -100 on padding and on every non-assistant token
``attention_mask``    (B, L) long (1 = real token) when padding; None when packing
``position_ids``      None when padding; (B, L) long when packing, restarting at 0 for each
                      sample (and for the trailing padding, which restarts again each time it
                      would reach the longest sample's length), so that transformers keeps
                      attention within each sample (its packed-sequence masks) and no position
                      exceeds what the samples alone use
``pixel_values``      (N, 3, H, W), the images in the order their placeholders appear,
                      row-major; None when the batch has no image. The samples' dtype: uint8
                      RGB (the stream's default; ``VLM.encode_images`` normalises them) or
                      normalised float; never a mix
``num_images``        (B,) long, images per row
``num_samples``       int, samples in the batch (packing: varies per batch)
``real_tokens``       int, non-padding tokens; ``total_tokens``: int, B * L
``loader_state``      dict, filled by the stream (see ``mmlm.data.stream``); {} here
``skipped``           dict[str, int], filled by the stream; {} here
====================  =====================================================================

The stream adds ``keys`` (list[str], the sample keys, row-major) for inspection. The model is
called as ``vlm(**model_inputs(batch))``, i.e. ``vlm(input_ids=..., labels=..., attention_mask=...,
position_ids=..., pixel_values=..., num_images=...)``.

Both collates share the streaming interface the pipeline's batch stage uses:
``ready(num_samples, num_tokens, batch_size)`` (is the buffer full enough to form a batch?),
``plan(lengths, batch_size) -> rows`` (indices into the buffer, one list per row; always places
the oldest sample, so none starves) and ``collate_rows(rows_of_samples) -> batch``.
Packing plans by best-fit decreasing over the buffer: the oldest sample opens the first row, then
longer samples first, each into the fullest row it still fits (a new row while fewer than
``batch_size`` rows exist).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmlm.pixels import cat_pixel_values

__all__ = ["PadCollate", "PackCollate", "length_window", "MODEL_INPUTS", "model_inputs", "empty_batch_fields"]

MODEL_INPUTS = ("input_ids", "labels", "attention_mask", "position_ids", "pixel_values", "num_images")


def model_inputs(batch: dict) -> dict:
    """The keyword arguments ``VLM.forward`` takes, from a batch (the rest is bookkeeping)."""
    return {k: batch[k] for k in MODEL_INPUTS}


def empty_batch_fields() -> dict:
    return {"loader_state": {}, "skipped": {}}


def length_window(lengths: Sequence[int], size: int) -> list[int]:
    """``size`` indices into ``lengths`` (more than ``size`` of them), in index order: index 0 and the
    ``size - 1`` others that make the fewest padding tokens (``size * max - sum``) with it; the set
    with the smallest indices on ties. The others form a run of the length-sorted rest (for a given
    maximum, the longest samples below it pad least), so only those runs are tried."""
    others = sorted(range(1, len(lengths)), key=lambda i: (lengths[i], i))  # (n - 1,)
    prefix = [0]
    for i in others:
        prefix.append(prefix[-1] + lengths[i])

    def cost(s: int) -> tuple[int, list[int]]:  # index 0 + others[s : s + size - 1]
        run = others[s:s + size - 1]
        top = max(lengths[0], lengths[run[-1]] if run else 0)
        return size * top - lengths[0] - (prefix[s + size - 1] - prefix[s]), sorted([0, *run])

    return min(cost(s) for s in range(len(others) - size + 2))[1]


def _length(sample: dict) -> int:
    return int(sample["input_ids"].numel())


class PadCollate:
    """One sample per row, right padded (``processor.pad``).

    ``group_by_length=G > 1`` buffers ``G * batch_size`` samples and forms each batch from the oldest
    sample and the ``batch_size - 1`` buffered samples nearest to it in length (the window of the
    length-sorted buffer that holds the oldest sample and pads least): far less padding, and
    batches whose rows are all of one length skip the attention mask's work. Every sample still
    trains once, at most about ``G`` batches later than in stream order.
    """

    packing = False

    def __init__(self, processor, group_by_length: int = 1):
        if int(group_by_length) < 1:
            raise ValueError(f"group_by_length must be >= 1 (1: no grouping), got {group_by_length}")
        self.processor = processor
        self.group_by_length = int(group_by_length)

    @property
    def max_sample_length(self) -> int | None:
        return None  # the processor's max_length bounds samples

    def ready(self, num_samples: int, num_tokens: int, batch_size: int) -> bool:
        return num_samples >= batch_size * self.group_by_length

    def plan(self, lengths: Sequence[int], batch_size: int) -> list[list[int]]:
        n = len(lengths)
        if self.group_by_length == 1 or n <= batch_size:
            return [[i] for i in range(min(batch_size, n))]
        return [[i] for i in length_window(lengths, batch_size)]

    def collate_rows(self, rows: Sequence[Sequence[dict]]) -> dict:
        if any(len(r) != 1 for r in rows):
            raise ValueError("PadCollate puts exactly one sample in each row")
        return self([r[0] for r in rows])

    def __call__(self, samples: Sequence[dict]) -> dict:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        out = self.processor.pad(list(samples), padding_side="right")
        batch, length = out["input_ids"].shape
        return {
            "input_ids": out["input_ids"],  # (B, L)
            "labels": out["labels"],  # (B, L)
            "attention_mask": out["attention_mask"],  # (B, L)
            "position_ids": None,
            "pixel_values": out["pixel_values"],  # (N, 3, H, W) | None
            "num_images": out["num_images"],  # (B,)
            "num_samples": len(samples),
            "real_tokens": int(out["attention_mask"].sum()),
            "total_tokens": int(batch * length),
            **empty_batch_fields(),
        }


class PackCollate:
    """Several samples per row, up to ``max_length`` tokens; no attention mask, restarting positions.

    Args:
        processor: gives the pad token id.
        max_length: tokens per packed row (a longer sample is an error: the stream drops them first).
        buffer_tokens: the streaming batch stage packs once the buffered samples hold this many
            tokens (default ``2 * batch_size * max_length``: enough choice to fill rows well).
        max_buffer_samples: ... or once this many samples are buffered.
    """

    packing = True

    def __init__(self, processor, max_length: int, buffer_tokens: int | None = None, max_buffer_samples: int = 4096):
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.processor = processor
        self.max_length = int(max_length)
        self.buffer_tokens = buffer_tokens
        self.max_buffer_samples = int(max_buffer_samples)

    @property
    def max_sample_length(self) -> int:
        return self.max_length

    def ready(self, num_samples: int, num_tokens: int, batch_size: int) -> bool:
        target = self.buffer_tokens if self.buffer_tokens is not None else 2 * batch_size * self.max_length
        return num_samples >= self.max_buffer_samples or num_tokens >= target

    def plan(self, lengths: Sequence[int], batch_size: int) -> list[list[int]]:
        """Best-fit decreasing of samples of ``lengths`` tokens into at most ``batch_size`` rows
        (lists of indices); the oldest sample (index 0) always opens the first row."""
        lengths = [int(n) for n in lengths]
        too_long = [i for i, n in enumerate(lengths) if n > self.max_length]
        if too_long:
            raise ValueError(f"sample of {lengths[too_long[0]]} tokens does not fit a packed row of max_length="
                             f"{self.max_length}")
        if not lengths:
            return []
        order = [0] + sorted(range(1, len(lengths)), key=lambda i: (-lengths[i], i))
        rows: list[list[int]] = []
        free: list[int] = []
        for i in order:
            fits = [r for r in range(len(rows)) if free[r] >= lengths[i]]
            if fits:
                r = min(fits, key=lambda r: (free[r], r))
            elif len(rows) < batch_size:
                rows.append([])
                free.append(self.max_length)
                r = len(rows) - 1
            else:
                continue
            rows[r].append(i)
            free[r] -= lengths[i]
        for row in rows:  # samples within a row in stream order
            row.sort()
        return rows

    def __call__(self, samples: Sequence[dict], batch_size: int | None = None) -> dict:
        """Pack ``samples`` (all of them when ``batch_size`` is None) into rows and collate."""
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        rows = self.plan([_length(s) for s in samples], batch_size or len(samples))
        return self.collate_rows([[samples[i] for i in row] for row in rows])

    def collate_rows(self, rows: Sequence[Sequence[dict]]) -> dict:
        rows = [list(r) for r in rows if r]
        if not rows:
            raise ValueError("cannot collate an empty batch")
        row_lengths = [sum(_length(s) for s in r) for r in rows]
        if max(row_lengths) > self.max_length:
            raise ValueError(f"a packed row of {max(row_lengths)} tokens exceeds max_length={self.max_length}")
        batch, length = len(rows), max(row_lengths)
        longest = max(_length(s) for r in rows for s in r)  # no position reaches it
        pad_id = self.processor.tokenizer.pad_token_id
        input_ids = torch.full((batch, length), pad_id, dtype=torch.long)  # (B, L)
        labels = torch.full((batch, length), -100, dtype=torch.long)  # (B, L)
        position_ids = torch.zeros((batch, length), dtype=torch.long)  # (B, L)
        num_images = torch.zeros(batch, dtype=torch.long)  # (B,)
        pixels = []  # (n, 3, H, W) per sample with images
        for r, row in enumerate(rows):
            off = 0
            for s in row:
                n = _length(s)
                input_ids[r, off:off + n] = s["input_ids"]
                lab = s["labels"].clone()
                lab[0] = -100  # it is the target of the previous sample's last token: never across samples
                labels[r, off:off + n] = lab
                position_ids[r, off:off + n] = torch.arange(n)
                off += n
                num_images[r] += int(s["num_images"])
                if s["pixel_values"] is not None:
                    pixels.append(s["pixel_values"])
            # padding: segments of its own, positions below the longest sample's (a row may be longer than
            # the LM's position table, as samples restart at 0; padding counting on would run past its end)
            position_ids[r, off:] = torch.arange(length - off) % longest
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": None,
            "position_ids": position_ids,
            "pixel_values": cat_pixel_values(pixels),  # (N, 3, H, W) | None
            "num_images": num_images,
            "num_samples": sum(len(r) for r in rows),
            "real_tokens": int(sum(row_lengths)),
            "total_tokens": int(batch * length),
            **empty_batch_fields(),
        }
