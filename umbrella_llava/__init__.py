"""umbrella_llava: LLaVA-style vision-language models on 3-D medical volumes, native to transformers.

Importing the package registers the config and models with the Auto classes, so `AutoConfig`, `AutoModel` and
`AutoModelForImageTextToText` resolve `model_type="umbrella_llava"` without `trust_remote_code`.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .configuration_umbrella_llava import UmbrellaLlavaConfig
from .image_processing_umbrella_llava import UmbrellaVolumeProcessor, stack_volumes
from .modeling_umbrella_llava import (
    UmbrellaLlavaForConditionalGeneration,
    UmbrellaLlavaModel,
    UmbrellaLlavaPreTrainedModel,
    UmbrellaVolumeEmbeddings,
)
from .processing_umbrella_llava import UmbrellaLlavaProcessor

AutoConfig.register(UmbrellaLlavaConfig.model_type, UmbrellaLlavaConfig, exist_ok=True)
AutoModel.register(UmbrellaLlavaConfig, UmbrellaLlavaModel, exist_ok=True)
AutoModelForImageTextToText.register(UmbrellaLlavaConfig, UmbrellaLlavaForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(UmbrellaLlavaConfig, slow_image_processor_class=UmbrellaVolumeProcessor, exist_ok=True)
AutoProcessor.register(UmbrellaLlavaConfig, UmbrellaLlavaProcessor, exist_ok=True)
# Saving any of these writes its code next to the weights and names it in `auto_map`, for trust_remote_code users.
UmbrellaLlavaConfig.register_for_auto_class("AutoConfig")
UmbrellaVolumeProcessor.register_for_auto_class("AutoImageProcessor")
UmbrellaLlavaProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "UmbrellaLlavaConfig",
    "UmbrellaLlavaProcessor",
    "UmbrellaVolumeProcessor",
    "stack_volumes",
    "UmbrellaLlavaForConditionalGeneration",
    "UmbrellaLlavaModel",
    "UmbrellaLlavaPreTrainedModel",
    "UmbrellaVolumeEmbeddings",
]
