"""pdserve engine: the model runtime every prefill and decode worker shares."""
