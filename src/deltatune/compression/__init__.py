"""Compression: pruning (unstructured, N:M, structured, layer removal), low-rank factorisation, recovery."""
