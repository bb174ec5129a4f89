"""A small ChatML tokenizer trained locally, for tests, the demo and offline experiments.

Real checkpoints bring their own tokenizer (Qwen's for llava-interleave); this one has the same special tokens
(`<|im_start|>`, `<|im_end|>`, `<|endoftext|>`, `<image>`) so that everything downstream sees the same layout.
"""

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

IMAGE_TOKEN = "<image>"
CHATML_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN]

_DEFAULT_CORPUS = [
    "system user assistant You are a helpful radiology assistant.",
    "Is this scan a T1-weighted brain MRI? Yes. No. Which scan is brighter? The first. The second.",
    "Compare this scan with the reference scan. What is the sex of the subject? male female",
    "Describe the brain volume: grey matter, white matter, cerebrospinal fluid, ventricles, cortex.",
    "0 1 2 3 4 5 6 7 8 9 A B C D left right anterior posterior superior inferior",
]


def build_chatml_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with ChatML special tokens, in about a second, without the network.

    Args:
        texts: training text; a small built-in radiology corpus when `None`. Every byte is always representable,
            so text outside the corpus still tokenizes (in more pieces).
        vocab_size: target vocabulary size, special tokens included.

    Returns:
        A `PreTrainedTokenizerFast` whose `image_token` is `<image>`, `eos_token` is `<|im_end|>` and `pad_token` is
        `<|endoftext|>`; `padding_side` is left, as generation wants.
    """
    corpus = list(texts) if texts is not None else _DEFAULT_CORPUS
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=CHATML_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": IMAGE_TOKEN, "im_start_token": "<|im_start|>"},
        padding_side="left",
    )
    return fast


__all__ = ["IMAGE_TOKEN", "CHATML_SPECIAL_TOKENS", "build_chatml_tokenizer"]
