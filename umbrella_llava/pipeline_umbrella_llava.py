"""The image-text-to-text pipeline of UmbrellaLlava: transformers' own, with 3-D volumes where it expects 2-D images.

A saved UmbrellaLlava checkpoint names this class under `custom_pipelines` in its `config.json` (as
`Pipeline.save_pretrained` does for a pipeline registered with `PIPELINE_REGISTRY`), so
`pipeline("image-text-to-text", model=folder, trust_remote_code=True)` builds it. With model and processor objects,
pass `pipeline_class=UmbrellaLlavaImageTextToTextPipeline`.

This file travels to the Hub as remote code: it imports only torch, transformers and its siblings.
"""

from typing import Any

import torch
from transformers.pipelines.image_text_to_text import ImageTextToTextPipeline

from .processing_umbrella_llava import drop_volume_inputs_without_volumes

# What `Pipeline.save_pretrained` writes into `config.json` for a pipeline registered with
# `PIPELINE_REGISTRY.register_pipeline("image-text-to-text", pipeline_class=..., pt_model=AutoModelForImageTextToText)`;
# the model's `save_pretrained` writes it, so that every saved checkpoint carries it. Registering the class in this
# process instead would take the task over for every model.
CUSTOM_PIPELINES = {
    "image-text-to-text": {
        "impl": "pipeline_umbrella_llava.UmbrellaLlavaImageTextToTextPipeline",
        "pt": ["AutoModelForImageTextToText"],
        "type": "multimodal",
    }
}


class UmbrellaLlavaImageTextToTextPipeline(ImageTextToTextPipeline):
    """[`ImageTextToTextPipeline`] for volumes. Chats with image items, a text with `<image>` placeholders beside
    `images=` (a NIfTI path, a DICOM series folder, an array or tensor `(H, W, D)` / `(C, H, W, D)`, or a list of
    them), and text alone work as in the stock pipeline. Two steps differ, because volumes are not PIL images:

    - `images=` go to the processor as given, which reads them; the stock pipeline opens them with PIL.
    - Each input's valid volumes travel flattened, `pixel_values (M, C, H, W, D)` with `num_images_per_sample (1,)`,
      LLaVA's own layout. The pipeline's collator concatenates `pixel_values` and pads the rest, so inputs with
      different numbers of volumes batch at `batch_size > 1`; `(1, N, ...)` slots of different N would not stack.
    """

    def preprocess(self, inputs=None, timeout=None, continue_final_message=None, **processing_kwargs):
        if isinstance(inputs, dict) and "images" in inputs:
            processor_kwargs = processing_kwargs.pop("processor_kwargs", None) or processing_kwargs
            if isinstance(inputs["text"], (list, tuple)) and len(inputs["text"]) > 1:
                processor_kwargs.setdefault("padding", True)
            model_inputs = self.processor(
                images=inputs["images"], text=inputs["text"], return_tensors="pt", **processor_kwargs
            ).to(dtype=self.dtype)
            model_inputs["text"] = inputs["text"]
        else:
            model_inputs = super().preprocess(
                inputs, timeout=timeout, continue_final_message=continue_final_message, **processing_kwargs
            )
        return self._flatten_volumes(model_inputs)

    def _flatten_volumes(self, model_inputs: Any) -> Any:
        """`pixel_values (B, N, C, H, W, D)` with `image_mask (B, N)` → the valid volumes `(M, C, H, W, D)`; an input
        without volumes gets `(0, C, H, W, D)` and zero counts, so that every input of a batch has the same keys."""
        image_mask = model_inputs.pop("image_mask", None)
        if image_mask is not None:
            model_inputs["pixel_values"] = model_inputs["pixel_values"][image_mask]
        elif "pixel_values" not in model_inputs:
            volume_processor = self.processor.image_processor
            shape = (0, volume_processor.volume_channels, *volume_processor.volume_size)
            model_inputs["pixel_values"] = torch.zeros(shape, dtype=self.dtype or torch.float32)
            model_inputs["num_images_per_sample"] = torch.zeros(len(model_inputs["input_ids"]), dtype=torch.long)
        return model_inputs

    def _forward(self, model_inputs, generate_kwargs=None):
        # A batch without any volume is text-only for the model.
        return super()._forward(drop_volume_inputs_without_volumes(dict(model_inputs)), generate_kwargs)


__all__ = ["CUSTOM_PIPELINES", "UmbrellaLlavaImageTextToTextPipeline"]
