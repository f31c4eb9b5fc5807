"""Thin reference vision-language models built from vlops.nn, and the synthetic data they train on."""
from . import synthetic

__all__ = ["synthetic"]
