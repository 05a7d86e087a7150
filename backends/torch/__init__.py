"""memcore.backends.torch: the layers and models of memcore as ``torch.nn.Module``s.

    layer = memcore.realize(spec, backend="torch", params=memcore.init(spec))
    y, state = layer(x, state)            # parallel form, [B, T, D]
    y_t, state = layer.step(x_t, state)   # streaming form, [B, D]

States use the reference's format, so they pass between backends. Files:

- the six primitives (DESIGN 2), each choosing its implementation (``implementation=``,
  ``implementation.py``): ``selective_scan``, ``leaky_average``, ``windowed_readout``,
  ``eidetic_store``, ``associative_readout``, ``persistent_readout``;
- ``layers/`` (one module per ``spec.layer``) and ``model`` (the composition);
- ``modules`` (``TorchLayer``, ``TorchModel``), ``realize`` (the entry point);
- helpers: ``numerics``, ``rotary``, ``rings``, ``banded`` (banded softmax), ``params``.
"""
