"""reasonedit: correct vision-language models with human reasoning, without retraining.

The package is usable as a library; the `reasonedit` command is a thin layer over it.
Heavy libraries (torch, transformers, sentence-transformers) are imported lazily inside
the functions that need them, so importing this package stays cheap.
"""

__version__ = "0.1.0"
