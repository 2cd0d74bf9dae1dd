"""Choosing a forward plan by measurement at load, cached on disk per machine and model."""
