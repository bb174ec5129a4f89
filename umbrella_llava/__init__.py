"""umbrella_llava: LLaVA-style vision-language models on 3-D medical volumes, native to transformers.

Importing the package registers the config and models with the Auto classes, so `AutoConfig`, `AutoModel` and
`AutoModelForImageTextToText` resolve `model_type="umbrella_llava"` without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from .configuration_umbrella_llava import UmbrellaLlavaConfig
from .modeling_umbrella_llava import (
    UmbrellaLlavaForConditionalGeneration,
    UmbrellaLlavaModel,
    UmbrellaLlavaPreTrainedModel,
    UmbrellaVolumeEmbeddings,
)

AutoConfig.register(UmbrellaLlavaConfig.model_type, UmbrellaLlavaConfig, exist_ok=True)
AutoModel.register(UmbrellaLlavaConfig, UmbrellaLlavaModel, exist_ok=True)
AutoModelForImageTextToText.register(UmbrellaLlavaConfig, UmbrellaLlavaForConditionalGeneration, exist_ok=True)
UmbrellaLlavaConfig.register_for_auto_class("AutoConfig")

__all__ = [
    "UmbrellaLlavaConfig",
    "UmbrellaLlavaForConditionalGeneration",
    "UmbrellaLlavaModel",
    "UmbrellaLlavaPreTrainedModel",
    "UmbrellaVolumeEmbeddings",
]
