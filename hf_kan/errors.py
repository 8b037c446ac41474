"""Exception types raised by hf-kan.

Every user-facing check raises one of these (never a bare ``assert``), with a
message that says what is wrong and what to do about it. They subclass the
matching built-in (``ValueError``, ``RuntimeError``) so generic handlers keep
working.
"""

from __future__ import annotations


class HFKanError(Exception):
    """Base class of every error hf-kan raises on purpose."""


class HFKanConfigError(HFKanError, ValueError):
    """A configuration value is invalid (out of range, wrong type, inconsistent with another field)."""


class UnsupportedModelError(HFKanError, ValueError):
    """The model (family, attention implementation or architecture) is not supported by the requested feature."""


class InputLayoutError(HFKanError, ValueError):
    """The model inputs do not match what the feature needs (e.g. image-token count vs. images, missing metadata)."""


class ImageSizeError(HFKanError, ValueError):
    """An image size the model cannot process (e.g. a token count fixed at construction time)."""


class ConversionError(HFKanError, ValueError):
    """A checkpoint given to a converter has an unknown key layout or unexpected shapes."""


class BackendUnavailableError(HFKanError, RuntimeError):
    """A compute backend was requested explicitly but cannot run here (e.g. Triton without CUDA or interpreter)."""


class HubUnavailableError(HFKanError, RuntimeError):
    """The Hugging Face Hub cannot be used for a requested upload (offline mode, no token, not reachable)."""


class ShippedModelMissingError(HFKanError, FileNotFoundError):
    """A model that ships inside the package is not in this installation (its package data was not built in)."""


__all__ = [
    "BackendUnavailableError",
    "ConversionError",
    "HFKanConfigError",
    "HFKanError",
    "HubUnavailableError",
    "ImageSizeError",
    "InputLayoutError",
    "ShippedModelMissingError",
    "UnsupportedModelError",
]
