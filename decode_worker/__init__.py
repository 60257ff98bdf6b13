"""decode worker package (see worker.py)."""
