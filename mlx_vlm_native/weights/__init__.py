"""Readers of checkpoint files and of the numbers they hold: safetensors checks, the safe
torch unpickler, config.json validation."""
