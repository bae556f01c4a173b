"""dynbert's version, which every metrics.json records: a module of its own, so that training records it
without importing the package's facade (``dynbert.load``), which stands above everything it loads."""

__version__ = "0.1.0"
