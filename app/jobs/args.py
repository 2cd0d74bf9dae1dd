"""Command-line arguments that several jobs share."""

from __future__ import annotations

import argparse

from app.jobs.datasets import CLASS_ORDERS


def add_class_order_arg(p: argparse.ArgumentParser) -> None:
    """How class folders map to the model's classes, for every job that reads them."""
    p.add_argument("--class-order", default="ids", choices=CLASS_ORDERS,
                   help="class folders: ids = named by label id/synset/index; "
                   "sorted = the i-th folder is class i")  # fmt: skip
