"""Alembic migrations (a package so an installed posegen can find them)."""
