"""Planning, run-directory state, the shard worker and the executors that schedule it."""
