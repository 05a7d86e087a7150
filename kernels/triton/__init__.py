"""memcore.kernels.triton"""
