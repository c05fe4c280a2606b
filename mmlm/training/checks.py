"""Set-up checks of a training run: small pure functions that fail loudly (or name what changed) before
the first step, where a mismatch would otherwise train silently wrong or die mid-step.

- ``check_normalization``: the model's on-device normalisation of uint8 batches = the processor's;
- ``check_attention_trains_on``: the LM's attention kernel has a backward pass on the device;
- ``check_packing``: packed rows, the model's image positions and its LM's attention mask can go together;
- ``hparam_changes``: the ``VLMModule`` arguments a resumed run changes from its checkpoint's run.
"""

from __future__ import annotations

import torch


def check_normalization(vlm, processor) -> None:
    """The model normalises uint8 batches with its own ``image_transform()`` mean/std, the processor
    normalises float pixel values (``describe``, ``eval``) with its config's: they must agree, or
    training and inference would feed the encoder differently normalised images."""
    mine, theirs = vlm.image_transform(), processor.config.image_transform
    if (tuple(mine.mean), tuple(mine.std)) != (tuple(theirs.mean), tuple(theirs.std)):
        raise ValueError(f"the processor normalises images with mean={theirs.mean} std={theirs.std} but the model "
                         f"with mean={mine.mean} std={mine.std}: fix image_transform in processor_config.json or in "
                         "the vision config so that they agree")


def check_packing(vlm, packing: bool) -> None:
    """Packed rows mark their samples' boundaries with restarting position ids, which a model with
    ``image_positions: shared`` (every token of an image at one position) cannot share, and which some
    transformers LMs do not read (OPT builds its causal mask without them: packed samples would attend to
    each other, silently). Both refused before any data is read (the second by :func:`packing_isolates`)."""
    if not packing:
        return
    if vlm.config.image_positions == "shared":
        raise ValueError("data.packing true cannot train a model with shared image positions (image_positions: "
                         "shared): transformers reads the packed samples' boundaries from the positions; train "
                         "with --data.packing false")
    if packing_isolates(vlm.lm) is False:
        raise ValueError(f"data.packing true: this LM ({type(vlm.lm).__name__}) lets packed samples attend to each "
                         "other (its attention mask ignores the restarting position ids that mark them), so "
                         "packing would train on the wrong context; train with --data.packing false")


def packing_isolates(lm, lengths: tuple[int, int] = (5, 4), atol: float = 1e-3) -> bool | None:
    """Does ``lm`` keep packed samples apart? Two short token sequences packed in one row (positions restarting
    at 0, no attention mask, as :class:`mmlm.data.PackCollate` makes them) must give the second the logits it
    gets alone. None when the probe cannot run here (weights not materialised, a kernel this device lacks)."""
    params = list(lm.parameters())
    if not params or any(p.device.type == "meta" for p in params):
        return None
    device = params[0].device
    vocab = lm.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, vocab, (1, n), generator=gen).to(device) for n in lengths)
    packed_pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).to(device)  # (1, n1 + n2)
    modes = [m for m in lm.modules() if m.training]
    for m in modes:  # no dropout in the probe
        m.training = False
    try:
        with torch.no_grad():
            packed = lm(input_ids=torch.cat([first, second], dim=1), position_ids=packed_pos,
                        use_cache=False).logits[0, lengths[0]:].float()
            alone = lm(input_ids=second, position_ids=packed_pos[:, :lengths[1]], use_cache=False).logits[0].float()
    except Exception:  # noqa: BLE001 - e.g. flash attention on a CPU: the first step will tell
        return None
    finally:
        for m in modes:
            m.training = True
    return bool(torch.allclose(packed, alone, atol=atol, rtol=1e-3))


def hparam_changes(saved: dict, current: dict) -> list[str]:
    """``"name: current (checkpoint: saved)"`` for each ``VLMModule`` argument that differs between a
    checkpoint's run and this one (Lightning's bookkeeping keys, ``_...``, left out)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if key.startswith("_"):
            continue
        old, new = saved.get(key), current.get(key)
        if isinstance(old, tuple | list) and isinstance(new, tuple | list):
            old, new = list(old), list(new)
        if old != new:
            out.append(f"{key}: {new!r} (checkpoint: {old!r})")
    return out


def check_attention_trains_on(vlm, device: torch.device) -> None:
    """FlexAttention has no backward pass on a CPU in torch, and every training stage backpropagates
    through the LM's attention (the align stage too, to reach the projector): refuse up front rather
    than fail in the first step's backward."""
    attn = getattr(vlm.lm.config, "_attn_implementation", None)
    if attn == "flex_attention" and torch.device(device).type == "cpu":
        raise ValueError("flex_attention trains on a GPU only (torch has no FlexAttention backward on a CPU): set "
                         "--model.model_overrides.text.attn_implementation sdpa (or eager)")
