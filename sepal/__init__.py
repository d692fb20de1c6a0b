"""Sepal core: what the server and the client both import.

The model factory, data loading, the wire format of an update and the crypto
primitives live here so that neither side reaches into the other.
"""

__version__ = "0.1.0"
