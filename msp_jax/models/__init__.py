"""Frozen backbones: one NNX file per family (gpt2, llama, t5), loaded by `weights.load_backbone`."""
