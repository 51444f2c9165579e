"""The kernels' own errors: this layer depends on torch alone, never on the rest of ragzip.

`ragzip.kv_engine` turns `UnsupportedModelError` into `ragzip.errors.UnsupportedModelError` for its users; the
surfaces (CLI, server) report any `KernelError` as a user error.
"""

from __future__ import annotations


class KernelError(Exception):
    """Root of the errors the kernels raise on purpose."""


class KernelConfigError(KernelError, ValueError):
    """Bad blending hyperparameters, or caches that do not match their segments or the model."""


class UnsupportedModelError(KernelError):
    """The model loads, but the blended prefill cannot run on it exactly."""
