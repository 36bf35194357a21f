"""Interop: Hugging Face folders <-> mmjax weights folders."""


class ConversionError(ValueError):
    """A model folder that cannot be converted; the message says why."""
