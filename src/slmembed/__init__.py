"""slmembed: contrastive fine-tuning of small language models into text-embedding models."""

__version__ = "0.1.0"
