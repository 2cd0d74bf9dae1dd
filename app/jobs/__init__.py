"""Offline jobs: FixRes fine-tuning, evaluation; shared data reading in data.py."""
