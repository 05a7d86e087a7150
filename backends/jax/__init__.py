"""memcore.backends.jax: the JAX backend.

Modules: ``realize`` (entry point; ``JaxLayer`` / ``JaxModel`` equinox modules), ``state``
(fixed-shape ``State`` pytrees and conversion to and from the reference's dicts), ``ops``
(the primitives behind ``memcore.ops`` for JAX arrays), ``train`` (an optax loop), and the
pure functions they share: ``scan`` (linear recurrences by associative scan), ``banded``
(windowed key sources as softmax partials), ``store`` (eidetic store), ``mamba``,
``windowed``, ``mosaic``, ``model``.
"""
