"""vlray: how far vision-only and language-only networks converge, at data-lake scale."""

__version__ = "0.2.0"
