"""memcore's experiments: data generators, training loops and the CLI tasks that run them."""
