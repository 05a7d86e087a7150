"""memcore.kernels.pallas"""
