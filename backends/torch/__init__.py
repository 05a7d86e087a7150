"""memcore.backends.torch: the layers and models of memcore as ``torch.nn.Module``s.

    layer = memcore.realize(spec, backend="torch", params=memcore.init(spec))
    y, state = layer(x, state)            # parallel form, [B, T, D]
    y_t, state = layer.step(x_t, state)   # streaming form, [B, D]

States use the reference's format (``memcore.spec.reference.layers``), so they pass between
backends. Modules:

- ``realize``: the entry point; ``layers`` / ``model``: the modules;
- ``mixers``: each layer's two forms; ``scan``: chunked linear recurrences (2.1, 2.2);
  ``attention``: banded softmax and ring buffers (2.3, 2.5); ``store``: innovation selection
  and the eidetic store (2.4); ``ops``: the array-in/array-out primitives behind
  ``memcore.ops`` for torch tensors.
"""
