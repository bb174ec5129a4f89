"""The hand-written training forward that UmbrellaLlava replaces, written here as a baseline to time against.

It is what research code for 3-D LLaVA (UMBRELLA's trainer among them) does around a stock vision tower and LM:
loop over the samples in Python, run the vision tower on *every* slot of the sample (padded slots included, whose
features are then thrown away), find the image-token positions, write the features there into a copy of the
sample's text embeddings, stack the samples back, and call the language model with `inputs_embeds`.

It reuses the modules (and so the weights) of an [`UmbrellaLlavaForConditionalGeneration`], so the two paths do the
same maths on the valid volumes and differ only in how the batch is organised.
"""

import torch
import torch.nn.functional as F

from umbrella_llava import UmbrellaLlavaForConditionalGeneration
from umbrella_llava.data import IGNORE_INDEX


def handwritten_loss(
    model: UmbrellaLlavaForConditionalGeneration,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor,
    labels: torch.LongTensor,
    pixel_values: torch.Tensor,
    **unused: torch.Tensor,
) -> torch.Tensor:
    """Causal-LM loss of a batch, computed by the per-sample loop.

    Args:
        model: supplies the vision tower, projector, language model and LM head.
        input_ids, attention_mask, labels: `(B, L)`, with `image_seq_length` image tokens per valid volume.
        pixel_values: `(B, N, C, H, W, D)` slots; all N are encoded, the features of the first
            (image tokens / image_seq_length) slots of each sample are kept.
        **unused: `image_mask`, `num_images_per_sample`: the loop does not look at them (it cannot skip padding).

    Returns:
        scalar mean cross-entropy over the tokens whose label is not -100.
    """
    inner = model.model
    image_token_id = model.config.image_token_id
    text_embeddings = inner.get_input_embeddings()(input_ids)
    rows = []
    for sample in range(input_ids.shape[0]):
        hidden = inner.vision_tower(pixel_values[sample]).last_hidden_state  # (N, tokens, vision hidden)
        features = inner.multi_modal_projector(hidden).flatten(0, 1)  # (N * tokens, text hidden)
        positions = (input_ids[sample] == image_token_id).nonzero().squeeze(1)
        row = text_embeddings[sample].clone()
        row[positions] = features[: len(positions)].to(row.dtype)
        rows.append(row)
    hidden_states = inner.language_model(
        inputs_embeds=torch.stack(rows), attention_mask=attention_mask
    ).last_hidden_state
    logits = model.lm_head(hidden_states).float()
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten().to(logits.device), ignore_index=IGNORE_INDEX
    )


def handwritten_training_step(model: UmbrellaLlavaForConditionalGeneration, batch: dict[str, torch.Tensor]) -> float:
    """Forward + backward of `handwritten_loss`; gradients are dropped afterwards. Returns the loss."""
    loss = handwritten_loss(model, **batch)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return float(loss.detach())
