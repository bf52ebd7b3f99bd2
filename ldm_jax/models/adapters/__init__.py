"""Adapters that attach to a model's own layers: LoRA (`lora.py`)."""
