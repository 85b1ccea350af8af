"""swarmd.kernels."""
