"""Sepal ServerApp: drives the rounds, decodes uploads, aggregates, evaluates, records."""
