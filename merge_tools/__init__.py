"""vora-merge: fold a VoRA training checkpoint's LoRA into its base LLM, shard by shard."""
