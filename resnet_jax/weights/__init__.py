"""Weights files: torch names <-> Flax tree, .pth/.safetensors without torch, metadata,
downloads (torchvision, the Hugging Face hub), save and load."""
