"""Numbered SQL migrations, one folder per backend."""
