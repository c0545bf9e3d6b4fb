"""The GPU worker: a Celery app whose tasks call the domain (`posegen`) and the engine."""
