"""edgeopt.fleet: device registry, signed repository, rollouts."""
