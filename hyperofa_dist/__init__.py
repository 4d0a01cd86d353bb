"""hyperofa-dist: HyperOFA vocabulary expansion as a distributed training system."""

__version__ = "0.1.0"
