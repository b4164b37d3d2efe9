"""Pipeline stages: plain callables over a columnar batch; no Ray, no run-directory state."""
