"""slmkit: train small GPT-style language models from scratch, fast, on a CPU or one GPU."""

__version__ = "0.1.0"

from slmkit.errors import SlmError

__all__ = ["SlmError", "__version__"]
