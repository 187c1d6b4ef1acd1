"""vora: Vision as LoRA — give a text LLM eyes with a patch embedding and LoRA, no vision encoder."""

from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoProcessor

from .configuration_vora import VoRAConfig
from .image_processing_vora import VoRAImageProcessor
from .modeling_vora import VoRAForCausalLM, VoRAPatchEmbed
from .processing_vora import VoRAProcessor

__version__ = "0.1.0"

# `import vora` is enough for the Auto classes to know VoRA checkpoints (no trust_remote_code).
AutoConfig.register("vora", VoRAConfig, exist_ok=True)
AutoModelForCausalLM.register(VoRAConfig, VoRAForCausalLM, exist_ok=True)
AutoImageProcessor.register(VoRAConfig, slow_image_processor_class=VoRAImageProcessor, exist_ok=True)
AutoProcessor.register(VoRAConfig, VoRAProcessor, exist_ok=True)

__all__ = ["VoRAConfig", "VoRAForCausalLM", "VoRAPatchEmbed", "VoRAImageProcessor", "VoRAProcessor"]
