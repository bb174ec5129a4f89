"""Where in the scan an answer comes from: a relevance map per volume, how much each voxel supports the answer's
tokens.

The answer's support is its log-likelihood: the sum, over the answer's tokens, of the log-probability the model gives
each after the prompt and the tokens before it (teacher forcing). Four methods, chosen between by measurement
(BENCHMARKS.md, "Relevance maps"):

- `"gradient"` (Captum's `Saliency`), the default: the absolute gradient of the support at each voxel. Of the four,
  its maps depend most on the trained weights (the randomisation sanity check), and it is the only one that can point
  at a voxel whose value is near zero, as a dark lesion is after z-scoring; as cheap as one backward pass.
- `"integrated_gradients"` (Captum's `IntegratedGradients`): the path integral of the gradient from a baseline, each
  volume's background (its minimum), to the volume, times the difference; complete (the voxels' relevance adds up to
  the change of the log-likelihood).
- `"gradient_x_input"` (Captum's `InputXGradient`): one gradient, times the input.
- `"attention_rollout"` (Abnar & Zuidema, 2020): the language model's attention rolled out from the answer's positions
  to the image tokens, then the vision tower's rolled out from its output tokens to the patches; a patch-level map.

Gradient maps are the absolute value of the attribution, summed over channels. Every map is on the model's grid
`(H, W, D)` (RAS+, `volume_size`); `scan_space.to_scan_space` writes it in the scan's own grid and affine.

Needs the `explain` extra (Captum, and scipy for the scan's grid): `pip install 'umbrella_llava[explain]'`.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from einops import repeat
from torch import nn

from .chat import VolumeConversation, user_turn
from .image_processing_umbrella_llava import VolumeInput
from .processing_umbrella_llava import UmbrellaLlavaProcessor

METHODS = ("gradient", "gradient_x_input", "integrated_gradients", "attention_rollout")
DEFAULT_METHOD = "gradient"
GRADIENT_METHODS = METHODS[:3]


def require_captum():
    """Import `captum.attr`, or raise an `ImportError` naming the extra to install."""
    try:
        import captum.attr
    except ImportError as error:
        raise ImportError(
            "Gradient relevance maps use Captum, which is not installed: `pip install 'umbrella_llava[explain]'`."
        ) from error
    return captum.attr


@dataclass
class Explanation:
    """What `explain` found.

    Attributes:
        question, answer: the user's question and the answer explained (given, or generated greedily).
        method: one of `METHODS`.
        relevance: `(N, H, W, D)` float32, one map per volume on the model's grid; higher supports the answer more.
        pixel_values: `(1, N, C, H, W, D)` the volumes as the model saw them.
        answer_log_likelihood: the answer's log-likelihood given the prompt and the volumes.
    """

    question: str
    answer: str
    method: str
    relevance: torch.Tensor
    pixel_values: torch.Tensor
    answer_log_likelihood: float


def answer_log_likelihood(
    model: nn.Module, prompt_ids: torch.Tensor, answer_ids: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function `pixel_values (K, N, C, H, W, D) → (K,)`: for each of K copies of the volumes, the answer's
    log-likelihood after the prompt (teacher forcing). Every slot holds a volume.

    Args:
        prompt_ids: `(L,)` the prompt, ending where the answer starts.
        answer_ids: `(T,)` the answer's tokens.
    """
    ids = torch.cat([prompt_ids, answer_ids]).to(model.device)
    positions = torch.arange(len(prompt_ids) - 1, len(ids) - 1, device=model.device)  # the logits that predict them
    targets = answer_ids.to(model.device)

    def log_likelihood(pixel_values: torch.Tensor) -> torch.Tensor:
        count = pixel_values.shape[0]
        logits = model(
            input_ids=ids.expand(count, -1),
            pixel_values=pixel_values,
            logits_to_keep=positions,
        ).logits.float()
        log_probs = logits.log_softmax(dim=-1)
        return log_probs.gather(-1, targets.expand(count, -1).unsqueeze(-1)).squeeze(-1).sum(dim=-1)

    return log_likelihood


def gradient_relevance(
    log_likelihood: Callable[[torch.Tensor], torch.Tensor],
    pixel_values: torch.Tensor,
    method: str = DEFAULT_METHOD,
    n_steps: int = 16,
    internal_batch_size: int | None = None,
) -> torch.Tensor:
    """Captum's attribution of `log_likelihood` to the voxels of `pixel_values (1, N, C, H, W, D)`, as
    `(N, H, W, D)`: the absolute attribution summed over channels.

    Args:
        method: `"gradient"`, `"gradient_x_input"` or `"integrated_gradients"` (baseline: each volume's background,
            its minimum).
        n_steps: integration steps of integrated gradients.
        internal_batch_size: how many of the `n_steps` copies go through the model at once (all by default); lower
            it to bound memory.
    """
    attr = require_captum()
    pixel_values = pixel_values.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        if method == "integrated_gradients":
            baseline = pixel_values.detach().amin(dim=(3, 4, 5), keepdim=True).expand_as(pixel_values)
            attributions = attr.IntegratedGradients(log_likelihood).attribute(
                pixel_values, baselines=baseline, n_steps=n_steps, internal_batch_size=internal_batch_size
            )
        elif method == "gradient_x_input":
            attributions = attr.InputXGradient(log_likelihood).attribute(pixel_values)
        elif method == "gradient":
            attributions = attr.Saliency(log_likelihood).attribute(pixel_values, abs=True)
        else:
            raise ValueError(f"Not a gradient method: {method!r}; expected one of {GRADIENT_METHODS}.")
    return attributions.detach()[0].abs().sum(dim=1).float()


def _rollout(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Attention rollout over layers: each `(B, heads, L, L)` averaged over heads, half identity for the residual,
    rows renormalised, multiplied from the first layer up. Returns `(B, L, L)`: row i, how much position i draws
    from each input position."""
    rollout = None
    for attention in attentions:
        mixed = attention.float().mean(dim=1)
        mixed = 0.5 * mixed + 0.5 * torch.eye(mixed.shape[-1], device=mixed.device)
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        rollout = mixed if rollout is None else mixed @ rollout
    return rollout


class _EagerAttention:
    """Within the block, the model computes attention weights it can return (eager), as rollout needs; the
    implementation it had is restored after."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.previous = {
            name: getattr(config, "_attn_implementation", None)
            for name, config in (("", self.model.config), *self._sub_configs())
        }
        self.model.set_attn_implementation("eager")

    def __exit__(self, *exc):
        previous = self.previous.get("")
        if previous is not None:
            self.model.set_attn_implementation(previous)
        return False

    def _sub_configs(self):
        config = self.model.config
        return [(key, getattr(config, key)) for key in ("text_config", "vision_config") if hasattr(config, key)]


def attention_rollout_relevance(
    model: nn.Module, prompt_ids: torch.Tensor, answer_ids: torch.Tensor, pixel_values: torch.Tensor
) -> torch.Tensor:
    """Attention rollout from the answer's positions to the voxels of `pixel_values (1, N, C, H, W, D)`:
    `(N, H, W, D)`, constant over each patch.

    The language model's rollout gives each image token the share of the answer's positions that flows from it;
    each volume's tokens are spread back over the patches they were merged from (`volume_merge_size`), and the vision
    tower's own rollout (over the layers up to the one the projector reads) carries that from its output tokens to
    the patches it embedded.
    """
    config = model.config
    ids = torch.cat([prompt_ids, answer_ids]).to(model.device)[None]
    volumes = pixel_values[0].to(model.device, model.dtype)
    with torch.no_grad(), _EagerAttention(model):
        output = model(input_ids=ids, pixel_values=volumes[None], output_attentions=True)
        tower = model.model.vision_tower(volumes, output_attentions=True)
    flow = _rollout(output.attentions)[0]  # (L, L)
    answer_rows = torch.arange(len(prompt_ids) - 1, ids.shape[1] - 1, device=flow.device)
    token_relevance = flow[answer_rows].sum(dim=0)[ids[0] == config.image_token_id]
    token_relevance = token_relevance.reshape(len(volumes), config.image_seq_length)  # (N, tokens)

    grid = config.volume_grid
    merge = config.volume_merge_size
    keeps_class = config.image_seq_length > config.volume_num_patches // config.volume_patches_per_token
    patch_tokens = token_relevance[:, int(keeps_class) :]
    # A merged token is the average of its block of patch tokens: each patch carries an equal share of it.
    h, w, d = (size // m for size, m in zip(grid, merge))
    patches = repeat(
        patch_tokens / config.volume_patches_per_token,
        "n (h w d) -> n (h mh w mw d md)",
        h=h, w=w, d=d, mh=merge[0], mw=merge[1], md=merge[2],
    )  # fmt: skip
    has_class = config.volume_class_token
    outputs = torch.zeros(len(volumes), config.volume_num_patches + int(has_class), device=patches.device)
    outputs[:, int(has_class) :] = patches
    if keeps_class:
        outputs[:, 0] = token_relevance[:, 0]
    layer = config.vision_feature_layer
    layers = layer if isinstance(layer, int) else max(layer)
    used = len(tower.attentions) + 1 + layers if layers < 0 else layers
    if used > 0:
        outputs = torch.einsum("nj,nji->ni", outputs, _rollout(tower.attentions[:used]))
    patch_relevance = outputs[:, int(has_class) :].reshape(len(volumes), *grid)
    ph, pw, pd = config.volume_patch_size
    voxels = repeat(patch_relevance, "n h w d -> n (h ph) (w pw) (d pd)", ph=ph, pw=pw, pd=pd)
    return voxels.float().cpu()


def explain(
    model: nn.Module,
    processor: UmbrellaLlavaProcessor,
    volumes: Sequence[VolumeInput],
    question: str,
    answer: str | None = None,
    method: str = DEFAULT_METHOD,
    n_steps: int = 16,
    internal_batch_size: int | None = None,
    max_new_tokens: int = 32,
) -> Explanation:
    """A relevance map per volume for the answer to `question` about `volumes` (generated greedily when `answer` is
    not given).

    Args:
        model, processor: an UmbrellaLlava model and its processor.
        volumes: the scans, as `VolumeConversation` takes them (NIfTI paths, DICOM folders, nibabel images, arrays).
        method: one of `METHODS`.
        n_steps, internal_batch_size: for integrated gradients (see `gradient_relevance`).
        max_new_tokens: the longest generated answer.

    Raises:
        ValueError: for an unknown method, or an empty answer (nothing to explain).
        ImportError: for a gradient method without Captum.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown relevance method {method!r}; choose one of {METHODS}.")
    conversation = VolumeConversation(model, processor, volumes, max_new_tokens=max_new_tokens)
    if answer is None:
        answer = conversation.ask(question)
    answer_ids = torch.tensor(processor.tokenizer(answer, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if len(answer_ids) == 0:
        raise ValueError(f"The answer to {question!r} is empty: there is nothing to explain.")
    prompt_ids = conversation.prompt_ids([user_turn(question, conversation.num_volumes)])
    pixel_values = conversation.pixel_values.to(model.device, model.dtype)
    log_likelihood = answer_log_likelihood(model, prompt_ids, answer_ids)
    if method == "attention_rollout":
        relevance = attention_rollout_relevance(model, prompt_ids, answer_ids, pixel_values).cpu()
    else:
        relevance = gradient_relevance(log_likelihood, pixel_values, method, n_steps, internal_batch_size).cpu()
    with torch.no_grad():
        likelihood = float(log_likelihood(pixel_values))
    return Explanation(question, answer, method, relevance, conversation.pixel_values, likelihood)


__all__ = [
    "DEFAULT_METHOD",
    "GRADIENT_METHODS",
    "METHODS",
    "Explanation",
    "answer_log_likelihood",
    "attention_rollout_relevance",
    "explain",
    "gradient_relevance",
]
