"""prefill worker package (see worker.py)."""
