"""micronet: train, compress and score efficient Transformer language models."""

__version__ = "0.1.0"
