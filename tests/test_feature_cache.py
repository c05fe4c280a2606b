"""The frozen-encoder feature cache: digests, lookups, capacity, and training with it."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from _training_kit import shards, tiny_model_args
from mmlm.training.feature_cache import ImageFeatureCache, image_digests
from mmlm.training.module import VLMModule


def test_image_digests_follow_the_pixels_dtype_and_shape():
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8, generator=g)
    twin = pixels.clone()
    twin[2, 1, 4, 4] ^= 1  # one bit of one pixel
    a, b = image_digests(pixels), image_digests(twin)
    assert a[:2] == b[:2] and a[2] != b[2] and len(set(a)) == 3
    assert image_digests(pixels[1:2]) == a[1:2]  # independent of the batch around the image
    assert image_digests(pixels.float())[0] != a[0]  # the same values as float are another input
    assert image_digests(pixels.permute(0, 1, 3, 2))[0] != a[0]
    assert image_digests(pixels.reshape(3, 3, 4, 16))[0] != a[0]  # same bytes, other shape


def _encoder():
    module = VLMModule(**tiny_model_args(stage="instruct"))
    module.build(train_shards=[str(shards() / "train")])
    vlm = module.vlm.eval()
    calls = []

    def encoder(pixels):
        calls.append(pixels.shape[0])
        return vlm.vision_features(pixels)

    return vlm, encoder, calls


def test_the_cache_runs_the_encoder_on_the_images_it_lacks_only():
    vlm, encoder, calls = _encoder()
    size = vlm.config.vision.image_size
    pixels = torch.randint(0, 256, (6, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    digests = image_digests(pixels)
    with torch.no_grad():
        expected = vlm.vision_features(pixels)  # (6, P, D)
    cache = ImageFeatureCache(capacity=4)
    torch.testing.assert_close(cache.encode(encoder, pixels[:4], digests[:4]), expected[:4], rtol=1e-6, atol=1e-6)
    assert calls == [4] and len(cache) == 4 and cache.hit_rate() == 0.0
    # images 2, 3 come from the store; 4, 5 are computed (and not kept: the store is full)
    out = cache.encode(encoder, pixels[2:], digests[2:])
    torch.testing.assert_close(out, expected[2:], rtol=1e-6, atol=1e-6)
    assert calls == [4, 2] and len(cache) == 4 and (cache.hits, cache.lookups) == (2, 8)
    # an all-hit batch in another order does not run the encoder
    torch.testing.assert_close(cache.encode(encoder, pixels[[3, 0]], [digests[3], digests[0]]), expected[[3, 0]],
                               rtol=1e-6, atol=1e-6)
    assert calls == [4, 2]
    with pytest.raises(ValueError, match="digests"):
        cache.encode(encoder, pixels[:2], digests[:1])
    with pytest.raises(ValueError, match="capacity"):
        ImageFeatureCache(0)


def test_projector_and_lm_train_the_same_with_cached_image_features(tmp_path):
    from mmlm.data import VLMDataModule

    def run(cache: int) -> VLMModule:
        pl.seed_everything(0)
        module = VLMModule(**tiny_model_args(stage="instruct", cache_image_features=cache))
        dm = VLMDataModule(train=str(shards() / "train"), batch_size=8, num_workers=0, shuffle_buffer=16,
                           min_samples=1000, seed=0)
        trainer = pl.Trainer(max_steps=12, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                             limit_val_batches=0, default_root_dir=tmp_path / str(cache))
        trainer.fit(module, dm)  # 96 samples of 48 images: the second pass hits the cache
        return module

    plain, cached = run(0), run(64)
    assert plain.feature_cache is None and cached.feature_cache.hits > 0
    assert 40 <= len(cached.feature_cache) <= 48  # the shards are drawn with replacement
    ref = plain.vlm.state_dict()
    for name, value in cached.vlm.state_dict().items():
        torch.testing.assert_close(value, ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_cache_needs_a_frozen_encoder():
    with pytest.raises(ValueError, match="stage 'full' trains"):
        VLMModule(**tiny_model_args(stage="full", cache_image_features=10))
    with pytest.raises(ValueError, match=">= 0"):
        VLMModule(**tiny_model_args(stage="instruct", cache_image_features=-1))
