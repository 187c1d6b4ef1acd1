"""vora: Vision as LoRA — give a text LLM eyes with a patch embedding and LoRA, no vision encoder."""

import sys

from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoProcessor

from .model import configuration_vora, image_processing_vora, mask, modeling_vora, processing_vora
from .model.configuration_vora import VoRAConfig
from .model.image_processing_vora import VoRAImageProcessor
from .model.modeling_vora import VoRAForCausalLM, VoRAPatchEmbed
from .model.processing_vora import VoRAProcessor

__version__ = "0.1.0"

# The shipped modules lived at the package top before vora.model existed; keep `import vora.mask` etc. working.
for _module in (configuration_vora, image_processing_vora, mask, modeling_vora, processing_vora):
    sys.modules[f"{__name__}.{_module.__name__.rsplit('.', 1)[1]}"] = _module

# `import vora` is enough for the Auto classes to know VoRA checkpoints (no trust_remote_code).
AutoConfig.register("vora", VoRAConfig, exist_ok=True)
AutoModelForCausalLM.register(VoRAConfig, VoRAForCausalLM, exist_ok=True)
AutoImageProcessor.register(VoRAConfig, slow_image_processor_class=VoRAImageProcessor, exist_ok=True)
AutoProcessor.register(VoRAConfig, VoRAProcessor, exist_ok=True)

__all__ = ["VoRAConfig", "VoRAForCausalLM", "VoRAPatchEmbed", "VoRAImageProcessor", "VoRAProcessor"]
