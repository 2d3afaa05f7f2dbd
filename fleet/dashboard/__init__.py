"""The fleet dashboard: ``edgeopt fleet serve --http HOST:PORT`` (fleet/dashboard/server.py)."""
