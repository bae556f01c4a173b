"""dynbert: learn which tokens BERT can drop (Jeong & Kwak, arXiv 2102.09727)."""

__version__ = "0.1.0"
