"""swarmd.swarm."""
