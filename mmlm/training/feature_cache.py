"""``ImageFeatureCache``: a frozen vision encoder's outputs, reused when an image comes again.

A training stream that revisits its images (epochs, resampled shards) runs a frozen encoder on the
same pixels again and again. The cache keys each image by a digest of its pixel tensor (dtype, shape
and bytes: :func:`image_digests`) and keeps the encoder's output for it, ``(P, D)``, so that a repeated
image costs a lookup instead of a forward pass. A cached output is what the encoder gave that image,
and recomputing it would give the same values as long as the encoder does not change, up to float
rounding (kernels may round differently for another batch size: the quickstart's review stage trained
600 steps with and without the cache to weights 2e-7 apart). :class:`mmlm.training.module.VLMModule`
uses the cache only when the vision encoder is frozen (stages ``align`` and ``instruct``), and a frozen
encoder runs in eval mode (no dropout, fixed batch-norm statistics). It serves CPU training, where the
encoder's forward can be a large part of a step and the pixels are on the host to be hashed (about
15 us per 72 x 72 image); on a GPU the encoder is cheap and hashing would copy the pixels back.

``capacity``: at most this many images are kept, the first ones seen (no eviction: a stream that
draws its images uniformly hits any kept set equally often). Memory: ``capacity x P x D`` values of
the encoder's output dtype on its device (the tiny preset: 81 x 128 float32, 41 KB per image).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch

__all__ = ["ImageFeatureCache", "image_digests"]


def image_digests(pixel_values: torch.Tensor) -> list[bytes]:
    """(N, 3, H, W) CPU tensor -> N 16-byte digests of each image's dtype, shape and values."""
    if pixel_values.device.type != "cpu":
        raise ValueError(f"image_digests reads pixels on the CPU, got {pixel_values.device}")
    x = pixel_values.detach().contiguous()
    head = f"{x.dtype}:{tuple(x.shape[1:])}:".encode()
    rows = x.reshape(x.shape[0], -1).view(torch.uint8).numpy()  # (N, bytes per image)
    return [hashlib.blake2b(head + row.tobytes(), digest_size=16).digest() for row in rows]


class ImageFeatureCache:
    """Encoder outputs by image digest; :meth:`encode` runs the encoder on the images it lacks only."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"the image feature cache needs a capacity >= 1, got {capacity}")
        self.capacity = int(capacity)
        self._store: dict[bytes, torch.Tensor] = {}  # digest -> (P, D)
        self.lookups = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._store)

    def encode(self, encoder: Callable[[torch.Tensor], torch.Tensor], pixel_values: torch.Tensor,
               digests: Sequence[bytes]) -> torch.Tensor:
        """The encoder's output for ``pixel_values`` (N, 3, H, W) -> (N, P, D): the images whose
        ``digests`` are stored come from the store, the others from one ``encoder`` call on them
        (in no-grad mode: the encoder is frozen), which the store then keeps while it has room."""
        n = pixel_values.shape[0]
        if len(digests) != n:
            raise ValueError(f"{len(digests)} image digests for {n} images")
        missing = [i for i, d in enumerate(digests) if d not in self._store]
        self.lookups += n
        self.hits += n - len(missing)
        computed = None
        if missing:
            rows = pixel_values if len(missing) == n else pixel_values[torch.tensor(missing, device=pixel_values.device)]
            with torch.no_grad():
                computed = encoder(rows)  # (M, P, D)
            for j, i in enumerate(missing):
                if len(self._store) >= self.capacity:
                    break
                self._store.setdefault(digests[i], computed[j].clone())  # a copy: not a view of the batch
            if len(missing) == n:
                return computed
        row = {i: j for j, i in enumerate(missing)}
        return torch.stack([computed[row[i]] if i in row else self._store[d] for i, d in enumerate(digests)])

    def hit_rate(self) -> float:
        """Hits over lookups so far (0.0 before any)."""
        return self.hits / self.lookups if self.lookups else 0.0
