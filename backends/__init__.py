"""memcore.backends"""
