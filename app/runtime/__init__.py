"""Running the network: the plan (how forwards run), the tuner that picks it on this
machine, the runtimes and rewrites it may use, and the engine. Tensors in, tensors out."""
