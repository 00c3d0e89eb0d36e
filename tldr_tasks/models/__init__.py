"""Models: the codebook captioner (captioner.py, tokenizer.py) and the downstream CLIP; size presets in model_configs/."""
