"""Offline jobs run from the CLI: evaluation and fine-tuning."""
