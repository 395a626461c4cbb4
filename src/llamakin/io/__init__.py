"""Checkpoint file readers and writers (safetensors, torch .bin with weights_only, config json)."""
