"""memcore.backends.torch"""
