"""Layout facts shared by the engine and KV transfer (see kv_layout/heads.py)."""
