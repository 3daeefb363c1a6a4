"""Offline RULER-style long-context evaluation: seeded task generators and their scoring."""
