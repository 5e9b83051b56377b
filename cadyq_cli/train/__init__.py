"""Training (kept apart from inference: the library never imports this package)."""
