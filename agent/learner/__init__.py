"""The learner: torch + peft training of LoRA adapters. Never imported by the inference path."""
