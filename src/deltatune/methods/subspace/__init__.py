"""Subspace methods: the whole update confined to a fixed random d-dimensional subspace of the targeted weights."""
