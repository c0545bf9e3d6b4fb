"""The HTTP front: FastAPI routes that parse, call the domain (`posegen`) and render."""
