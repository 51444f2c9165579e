"""Compressors: EXIT-style extractive, LLMLingua-2-style token-level, CRAG clustering, baselines.

Import the concrete modules (or use `ragzip.compressors.registry.get_compressor`); this package stays import-light.
"""
