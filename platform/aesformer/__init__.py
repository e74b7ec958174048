"""AesFormer: aesthetic photo reconstruction platform (library part).

Importing this package starts nothing and needs no GPU.
"""
__version__ = "0.1.0"
