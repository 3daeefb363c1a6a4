"""Model loading and the built-in offline demo models."""
