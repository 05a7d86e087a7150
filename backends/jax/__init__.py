"""memcore.backends.jax: the JAX backend.

The six primitives of DESIGN section 2, one file each (``selective_scan``, ``leaky_average``,
``windowed_readout``, ``eidetic_store``, ``associative_readout``, ``persistent_readout``), with
the reference's names and signatures (``memcore.ops`` routes JAX arrays to them) and an
``implementation="auto" | "jax" | "pallas"`` seam where a Pallas kernel exists
(``implementation``). ``layers/`` composes them into the realizations of section 3, ``model``
into stacks; ``modules`` holds the equinox modules ``realize`` returns, ``state`` their
fixed-shape states. Shared numerics: ``numerics``, ``rotary``, ``rings``; packed rows
(DESIGN 5a, ``cu_seqlens`` with traced boundaries): ``packed`` and ``layers/packed``.
"""
