"""Test-time augmentation: view plans, preprocessing and averaging."""
