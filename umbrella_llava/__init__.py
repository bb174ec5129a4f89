"""umbrella_llava: LLaVA-style vision-language models on 3-D medical volumes, native to transformers."""

from .configuration_umbrella_llava import UmbrellaLlavaConfig

__all__ = ["UmbrellaLlavaConfig"]
