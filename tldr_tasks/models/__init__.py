"""Models: the codebook captioner (captioner.py, tokenizer.py), the downstream CLIP, and their
size presets in model_configs/."""
