"""SQLAlchemy 2 models and session factory. Postgres in production, SQLite when embedded."""
