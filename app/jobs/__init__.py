"""Offline jobs run from the CLI: FixRes fine-tuning and evaluation."""
