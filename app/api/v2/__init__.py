"""The Open Inference Protocol (KServe v2) as an edge over the same service as /v1."""
