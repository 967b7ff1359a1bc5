"""tokensift: select training documents and weight their tokens, at cluster scale."""

__version__ = "0.1.0"
