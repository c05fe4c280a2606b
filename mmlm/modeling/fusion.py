"""Where vision meets text: small pure functions that place image tokens and fail loudly.

The processor expands each ``<image>`` placeholder into exactly T copies of the image
token id (T = tokens per image). ``check_image_tokens`` verifies that every sample holds
as many placeholder tokens as its images have features, and names the sample otherwise;
``merge_image_features`` writes the features, in order, at the placeholder positions.

The loss lives here too: ``shifted_cross_entropy`` takes full logits (B, L, V);
``labelled_cross_entropy`` gives the same value from hidden states (B, L, D) and the output
layer, applying the layer only at the positions that predict a label (position p when
``labels[:, p+1] != ignore_index``), so no (B, L, V) tensor is built.
"""

from __future__ import annotations

import torch


def check_image_tokens(
    input_ids: torch.Tensor,  # (B, L)
    image_token_id: int,
    tokens_per_image: int,
    num_feature_images: int,
    num_images: torch.Tensor | list[int] | None = None,  # (B,) images per sample
) -> None:
    """Raise ``ValueError`` naming the first sample whose placeholder count is wrong."""
    counts = (input_ids == image_token_id).sum(dim=1).tolist()
    if num_images is not None:
        per_sample = [int(n) for n in (num_images.tolist() if torch.is_tensor(num_images) else num_images)]
        if len(per_sample) != len(counts):
            raise ValueError(f"num_images has {len(per_sample)} entries for a batch of {len(counts)} samples")
        for i, (have, n) in enumerate(zip(counts, per_sample)):
            if have != n * tokens_per_image:
                raise ValueError(
                    f"sample {i}: {have} image placeholder tokens but {n} image(s) x {tokens_per_image} "
                    f"features = {n * tokens_per_image}"
                )
        if sum(per_sample) != num_feature_images:
            raise ValueError(f"num_images sums to {sum(per_sample)} but pixel_values holds {num_feature_images} images")
        return
    for i, have in enumerate(counts):
        if have % tokens_per_image:
            raise ValueError(
                f"sample {i}: {have} image placeholder tokens is not a whole number of images "
                f"({tokens_per_image} features each)"
            )
    if sum(counts) != num_feature_images * tokens_per_image:
        raise ValueError(
            f"the batch has {sum(counts)} image placeholder tokens (per sample: {counts}) but "
            f"{num_feature_images} image(s) x {tokens_per_image} features = {num_feature_images * tokens_per_image}"
        )


def merge_image_features(
    input_ids: torch.Tensor,  # (B, L)
    inputs_embeds: torch.Tensor,  # (B, L, D)
    image_features: torch.Tensor,  # (N, T, D)
    image_token_id: int,
) -> torch.Tensor:
    """Replace the embeddings at the placeholder positions by the image features, in order."""
    mask = (input_ids == image_token_id).unsqueeze(-1)  # (B, L, 1)
    feats = image_features.reshape(-1, image_features.shape[-1]).to(inputs_embeds.dtype)  # (N*T, D)
    return inputs_embeds.masked_scatter(mask, feats)


def shared_image_positions(
    input_ids: torch.Tensor,  # (B, L)
    image_token_id: int,
    tokens_per_image: int,
    attention_mask: torch.Tensor | None = None,  # (B, L), 1 = real token
    position_ids: torch.Tensor | None = None,  # (B, L), restarting at 0 for each packed sample
) -> torch.Tensor:
    """Rotary positions (B, L) in which the ``tokens_per_image`` tokens of one image share the position
    of its first token and the text after an image continues one past it.

    The base positions are ``position_ids`` (packed rows), else the attention mask's running count
    (left padding), else 0..L-1; each image token but an image's first takes one position less than
    the tokens before it counted (within one packed sample; images back to back stay apart). Scores then
    depend on an image token's content, not on its offset from the text; its place in the image
    must come from the token itself (``ProjectorConfig.position_embedding``)."""
    b, length = input_ids.shape
    if position_ids is None:
        if attention_mask is None:
            position_ids = torch.arange(length, device=input_ids.device).expand(b, length)
        else:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    start = position_ids == 0  # (B, L) a packed sample (or a left pad) begins
    image = input_ids == image_token_id
    seen = image.long().cumsum(-1)  # (B, L) image tokens so far in the row
    # image tokens so far at the last token that ends a run (text, or a sample's start): the run's base
    base = torch.where(~image | start, seen - image.long(), torch.zeros_like(seen)).cummax(-1).values
    in_run = seen - base - 1  # (B, L) index of an image token within its run of image tokens
    follows = image & (in_run % tokens_per_image != 0)  # (B, L) an image token but its image's first
    count = follows.long().cumsum(-1)  # (B, L) such tokens so far in the row
    index = torch.arange(length, device=input_ids.device).expand(b, length)
    first = torch.where(start, index, torch.zeros_like(index)).cummax(-1).values  # (B, L) its sample's start
    before = count.gather(1, first) - follows.long().gather(1, first)  # (B, L) counted before the sample
    return position_ids - (count - before)


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy over labels != ignore_index: logits (B, L, V), labels (B, L)."""
    logits = logits[:, :-1].float()  # (B, L-1, V)
    targets = labels[:, 1:]  # (B, L-1)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index
    )


def labelled_positions(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """(B, L) bool: True at the positions whose next token is labelled (``labels[:, p+1] != ignore_index``),
    i.e. the positions that ``shifted_cross_entropy`` scores; the last position never is."""
    mask = torch.zeros_like(labels, dtype=torch.bool)  # (B, L)
    mask[:, :-1] = labels[:, 1:] != ignore_index
    return mask


def projected_cross_entropy(
    rows: torch.Tensor,  # (N, D) hidden states at the scored positions
    targets: torch.Tensor,  # (N,) next-token ids
    output_layer: torch.nn.Module,  # (..., D) -> (..., V)
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean cross-entropy of ``output_layer(rows)``, upcast to float32, against ``targets``. A separate
    function so that it can be compiled on its own (``mmlm.training.compile``): fused, it never writes
    the (N, V) float32 logits, which for a large vocabulary is most of the loss's memory traffic."""
    logits = output_layer(rows).float()  # (N, V)
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=ignore_index)


def labelled_cross_entropy(
    hidden: torch.Tensor,  # (B, L, D) final hidden states of the LM
    labels: torch.Tensor,  # (B, L)
    output_layer: torch.nn.Module,  # (..., D) -> (..., V)
    ignore_index: int = -100,
    project=projected_cross_entropy,
) -> torch.Tensor:
    """``shifted_cross_entropy(output_layer(hidden), labels, ignore_index)``, with the output layer applied
    only at the N labelled positions: same mean over those N tokens, same float32 upcast of the logits
    (NaN when N = 0, as there). ``project`` computes the loss of the gathered rows (a compiled
    :func:`projected_cross_entropy` when the model was compiled)."""
    mask = labelled_positions(labels, ignore_index)  # (B, L)
    rows = hidden[mask]  # (N, D)
    targets = labels[:, 1:][mask[:, :-1]]  # (N,)
    return project(rows, targets, output_layer, ignore_index)
