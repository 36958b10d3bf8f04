"""The console entry point (``memsieve``): the command line lives in ``pipeline.cli``."""

from pipeline.cli import main

__all__ = ["main"]
