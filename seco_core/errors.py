"""Errors a caller can act on."""


class UnsupportedModelError(ValueError):
    """The model cannot be trained exactly chunk by chunk; the message names the architecture."""
