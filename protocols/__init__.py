"""swarmd.protocols."""
