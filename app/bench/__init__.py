"""``midserve bench``: throughput against the hardware bound and the naive pipeline.

Everything is measured in ONE run so the ratios hold on a noisy machine. Prints a table and
one final JSON line. Not a test: nothing here asserts a speed.

``roofline`` (what the hardware allows), ``timing`` (in-process throughputs),
``server_load`` (a real server under HTTP load), ``cpu_budget`` (the server's CPU per
request around the network, by thread: ``proc`` reads it, ``load_client`` loads the
server), ``policies`` (view policies side by side on one server), ``run`` (one bench
run), ``cli``.
"""

from pathlib import Path

# the project's sample photos: shared/ beside the checkout
SAMPLES = Path(__file__).resolve().parents[3] / "shared" / "data" / "imagenet-samples"
