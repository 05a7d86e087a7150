"""memcore.backends.jax"""
