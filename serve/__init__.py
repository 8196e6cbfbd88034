"""serve/: vLLM serving of the base model with hot-swapped LoRA adapters."""
