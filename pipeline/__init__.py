"""Planning, run-directory state, the shard worker and the executors that schedule it."""

__version__ = "0.1.0"
