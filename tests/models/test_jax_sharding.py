"""Data parallelism: a batch sharded over two host CPU devices gives the loss of one
device. Runs in a subprocess, because the device count is fixed when JAX starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json
    import equinox as eqx
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import memcore
    from memcore import spec as S
    from memcore.backends.jax.realize import realize

    def loss_fn(model, tokens, aux_weight):
        # next-token cross-entropy plus the weighted innovation loss
        logits, _, aux = model.forward_aux(tokens[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        ce = -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
        return ce + aux_weight * aux, (ce, aux)

    spec = S.model([S.bmojo(6, 2, window=2, chunk=3, select=1, capacity=2, d_state=2),
                    S.mosaic(6, 2, capacity=3)], vocab_size=7)
    model = realize(spec, memcore.init(spec, 0, dtype=np.float64))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 7, size=(4, 9)), jnp.int32)
    loss = eqx.filter_jit(lambda m, t: loss_fn(m, t, 0.1)[0])
    loss1 = loss(model, tokens)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    tok2 = jax.device_put(tokens, NamedSharding(mesh, P("data")))
    model2 = jax.device_put(model, NamedSharding(mesh, P()))
    loss2 = loss(model2, tok2)
    print(json.dumps({"devices": len(jax.devices()),
                      "shards": len(tok2.sharding.device_set),
                      "loss1": float(loss1), "loss2": float(loss2)}))
""")


def test_two_device_data_parallel_loss_equals_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["devices"] == 2 and res["shards"] == 2
    assert abs(res["loss2"] - res["loss1"]) <= 1e-9 * abs(res["loss1"])
