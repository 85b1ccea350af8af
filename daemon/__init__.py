"""swarmd.daemon."""
