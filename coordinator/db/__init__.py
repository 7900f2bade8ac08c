"""Database access: typed models, engine and session factory, public ids."""
