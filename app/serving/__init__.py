"""The serving core: the models a server holds and their lifecycle (``models.py``), one
request's execution (``service.py``), the cross-request batcher and its forward workers,
and fault handling and injection. No HTTP and no wire schema in here: the edges
(``app/api/``) call it through ``app/api/edge.py``."""
