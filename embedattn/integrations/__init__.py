"""Integrations with other libraries (transformers, torch.compile)."""
