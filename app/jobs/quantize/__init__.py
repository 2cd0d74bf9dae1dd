"""``midserve quantize``: the model's network in int8, written into its entry, for the tuner.

Post-training quantization (NNCF on the OpenVINO network, full bias correction) calibrated
on the views the server cuts (center crops and whole images at the model's resize) of one
half of a folder of real photos; the other half is held out: its center crops are stored
as the tuner's check views, and, where the photos are labelled, the job reports int8's
top-1 against float32 and bf16 on them with paired 95 % intervals, so no loss is silent.

``cli`` is the command line (no torch); ``run`` does the work.
"""
