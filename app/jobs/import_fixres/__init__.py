"""``midserve import-fixres``: a published FixRes checkpoint -> a model-repository entry.

Published FixRes checkpoints are ``{"model": {"module.<name>": tensor, ...}, ...}`` (saved
from DistributedDataParallel). The import strips ``module.``, insists that every tensor
matches the timm architecture one to one (missing, extra and mis-shaped keys are named),
and writes plain safetensors, so serving never unpickles anything.

``cli`` is the command line (no torch); ``run`` does the work.
"""
