"""The layer contract of the reference's ``layers/`` modules: ``init_state(spec, batch, like)``,
``forward(spec, params, x, state) -> (y, state, aux)`` and ``step(spec, params, x_t, state) ->
(y_t, state, aux)``, one module per ``spec.layer``, and the checked entry points built on them."""

from __future__ import annotations

import numpy as np
import pytest
from memcore.spec.reference import layers as L
from refcheck import assert_close, inputs, params64

from memcore import spec as S

SPECS = [S.transformer(4, 2, window=2), S.mamba(4, d_state=2), S.bmojo_f(4, 2, 2, d_state=2),
         S.bmojo(4, 2, 2, chunk=2, select=1, capacity=2, d_state=2), S.mosaic(4, 2),
         S.persistent(4, 2, 3)]


@pytest.mark.parametrize("spec", SPECS, ids=[s.kind for s in SPECS])
def test_module_forms_are_the_checked_forms(spec):
    module = L.layer_module(spec)
    assert module is L.MODULES[spec.layer]
    p, x = params64(spec), inputs(spec, 2, 5)
    state = module.init_state(spec, 2, np.zeros((1,)))
    assert state["pos"] == 0 and "spec_id" not in state
    assert set(state) - {"pos"} == set(L.state_arrays(np, spec, 2, np.float64, x))
    y, s1, aux = module.forward(spec, p, x, state)
    want, s_want, aux_want = L.forward_aux(spec, p, x)
    assert_close(y, want, "y (module forward vs forward_aux)")
    assert s1["pos"] == 5 and set(s1) == set(s_want) - {"spec_id"}
    assert (aux is None) == (aux_want is None) == (spec.kind != "bmojo")
    y_t, s2, _ = module.step(spec, p, x[:, 0], state)
    want_t, _, _ = L.step_aux(spec, p, x[:, 0])
    assert_close(y_t, want_t, "y_t (module step vs step_aux)")
    assert s2["pos"] == 1


def test_a_spec_without_a_layer_module_is_refused():
    with pytest.raises(TypeError, match=r"spec must be a memcore layer spec"):
        L.layer_module(S.SelectiveScanSpec(4, 2))
