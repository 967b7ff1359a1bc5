"""Shipped sample data: a small multi-domain corpus of real text read from installed packages."""
