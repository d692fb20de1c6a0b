"""Experiments on the real Flower runtime: federations of virtual clients and baselines."""
