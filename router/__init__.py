"""The router: front door, prefix-cache index client, SLO-aware scheduling."""
