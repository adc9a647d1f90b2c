"""Benchmarks of pgpubsub against django-pgpubsub 1.3.1: ``python -m benchmarks --help``."""
