"""The store's schema as Alembic revisions (store/migrate.py runs them; versions/ holds them)."""
