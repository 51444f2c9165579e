"""Selective-recompute math (CacheBlend): RoPE re-rotation, deviation-based selection, exact-mask
partial attention and the blended prefill for Hugging Face causal LMs.

Import-light on purpose: import the submodules (`ragzip.kernels.blend`, ...) directly.
"""
