"""The HTTP edge: routes, request parsing, and the only place domain errors become status codes."""
