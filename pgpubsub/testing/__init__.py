"""Helpers for testing projects that use pgpubsub (and for pgpubsub's own tests)."""
