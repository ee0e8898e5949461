"""Alembic migrations of the ichigo-batch store (applied by ``ichigo db upgrade``)."""
