"""keel's version, in a module of its own: the run-directory code records it without importing the package face."""

__version__ = "0.1.0"
