"""Sepal ClientApp: one per institution, fine-tunes locally and uploads an encoded update."""
