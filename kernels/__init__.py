"""memcore.kernels"""
