"""FixRes: fine-tune at the test resolution, then write a model-repository entry the server serves.

FixRes (Touvron et al. 2019) raises the test resolution (the resize size scales with it, so
crop_pct is unchanged) and fine-tunes only the classifier and the batch-norm before global
pooling, at the test resolution, with test-time augmentation. The network stays in eval
mode except the parts being trained; the last batch-norm, in train mode, re-estimates its
running statistics at the new resolution. ``--bn-only`` is the label-free variant: every
batch-norm re-estimates its statistics from unlabelled images, no gradient step.

Runs as one process, or under ``torchrun --nproc_per_node N`` with DistributedDataParallel
(gloo on CPU, nccl on GPU). Under DDP the trained batch-norm uses statistics of the whole
global batch (summed across processes), so N processes compute what one process would.
"""
