"""Hardware profiles (``profiles/*.toml``, one per board) and the agent's systemd unit, shipped as data."""
