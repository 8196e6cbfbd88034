"""sft/: instruction tuning with TRL and PEFT LoRA, data checks, evaluation, the tiny base model."""
