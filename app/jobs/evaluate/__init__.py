"""``midserve evaluate``: the MID paper's tables and Fig. 3 for any model on any labelled folder.

Cost model: every image is decoded and resized once; one *pool* of views is planned for it
(``plan_views`` with the largest count of each kind any config needs); every config's
views are a prefix of each kind in that pool (``center`` is the first fixed crop), so one
forward over the pool serves all configs, which are then averaged separately with
``average_probabilities``. A 10-config run costs one forward of the distinct views.

Random views of a config are the first ``n`` of the pool's random views, so ``random:10``
is a prefix of ``random:20`` and of the sweep's ``random:40`` (the usual way to draw an
accuracy-vs-crops curve). Their positions are uniformly random as in serving, but not the
exact boxes a server request with the same seed gets (that one plans its spec alone).

The engine is built like the server's (``MIDSERVE_*`` settings: dtype, inference rewrites),
so the numbers describe what is served unless ``--dtype`` says otherwise.

Per-image results go to ``records.jsonl`` in the output folder as they are computed, so an
interrupted run continues where it stopped; under ``torchrun`` every rank takes every
``world``-th image and rank 0 writes the report.
"""
