"""Specs: JSON round trip, hashability and equality, immutability, and fingerprints."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from refcheck import REALIZATIONS

from memcore import spec as S

any_spec = st.one_of([s for _, s in REALIZATIONS])


@given(spec=any_spec)
def test_json_round_trip(spec):
    text = spec.to_json()
    back = S.from_json(text)
    assert back == spec
    assert type(back) is type(spec)
    assert back.to_json() == text
    assert back.spec_id == spec.spec_id
    assert S.from_dict(json.loads(text)) == spec
    assert S.from_dict(spec.to_dict()) == spec


@given(spec=any_spec)
def test_hashable_and_equal_to_a_rebuilt_copy(spec):
    copy = S.from_json(spec.to_json())
    assert copy is not spec
    assert hash(copy) == hash(spec)
    assert {spec: 1}[copy] == 1
    assert len({spec, copy}) == 1


@given(a=any_spec, b=any_spec)
def test_equality_follows_the_json(a, b):
    assert (a == b) == (a.to_json() == b.to_json())
    assert (a.spec_id == b.spec_id) == (a == b)


@given(spec=any_spec)
def test_frozen(spec):
    field = dataclasses.fields(spec)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(spec, field, getattr(spec, field))


def test_fingerprint_is_stable_text():
    """spec_id is a function of the JSON alone (states carry it across processes)."""
    spec = S.transformer(8, 2, window=4)
    assert spec.to_json() == ('{"d_model":8,"kind":"transformer","n_heads":2,'
                              '"positions":"rope","window":4}')
    assert spec.spec_id == S.from_json(spec.to_json()).spec_id
    assert len(spec.spec_id) == 16
    assert spec.spec_id != S.transformer(8, 2, window=5).spec_id


def test_fields_that_differ_make_specs_differ():
    base = S.bmojo(8, 2, 4, chunk=4, select=2, capacity=3)
    for change in (dict(chunk=3), dict(select=1), dict(capacity=4), dict(window=5),
                   dict(fading=False), dict(tie_fading=False), dict(positions="none")):
        other = dataclasses.replace(base, **change)
        assert other != base and other.spec_id != base.spec_id, change
    assert S.bmojo_f(8, 2, 4) != S.bmojo(8, 2, 4, chunk=4, select=0, capacity=0)


def test_constructors_match_the_design_signatures():
    assert S.transformer(8, 2) == S.Transformer(8, 2, None, "rope")
    assert S.mamba(8).d_state == 16 and S.mamba(8).d_conv == 4 and S.mamba(8).expand == 2
    assert S.mamba(8).dt_rank_value == 1 and S.mamba(40).dt_rank_value == 3
    assert S.mosaic(8, 2).capacity is None
    j = S.jamba(8, 2, pattern="MMA", n_layers=5)
    assert [type(layer).__name__ for layer in j.layers] == [
        "Mamba", "Mamba", "Transformer", "Mamba", "Mamba"]
    m = S.model([S.mosaic(14, 2)], 10, ffn="persistent")
    assert m.ffn == S.persistent(14, 2, 49)  # 3.5 d_model slots, heads of the first mixer
    assert S.model([S.mamba(6)], 10, ffn="persistent").ffn.n_heads == 1


def test_model_layers_list_becomes_tuple():
    m = S.model([S.mamba(4), S.transformer(4, 2)], 7)
    assert isinstance(m.layers, tuple)
    assert hash(m) == hash(S.model((S.mamba(4), S.transformer(4, 2)), 7))


@given(spec=st.sampled_from([S.SelectiveScanSpec(4, 2), S.LeakyAverageSpec(2, 3),
                             S.EideticStoreSpec(4, 2, 3, 5),
                             S.WindowedReadoutSpec(2, 3, 4, fading=True,
                                                   store=S.EideticStoreSpec(4, 2, 3, 4)),
                             S.AssociativeReadoutSpec(2, 3, 5),
                             S.PersistentReadoutSpec(2, 3, 7)]))
def test_primitive_specs_round_trip(spec):
    assert S.from_json(spec.to_json()) == spec
    assert hash(S.from_json(spec.to_json())) == hash(spec)


def test_layer_specs_build_their_primitive_specs():
    b = S.bmojo(8, 2, 4, chunk=4, select=2, capacity=3, d_state=5)
    assert b.readout == S.WindowedReadoutSpec(2, 4, 4, "rope", fading=True,
                                              store=S.EideticStoreSpec(4, 2, 3, 4))
    assert b.fading_block == S.mamba(8, d_state=5)
    assert S.bmojo_f(8, 2, 4).store is None
    assert S.mosaic(8, 2, capacity=3).readout == S.AssociativeReadoutSpec(2, 4, 3)
    with pytest.raises(ValueError, match=r"window must be an int when fading or a store"):
        S.WindowedReadoutSpec(2, 4, None, fading=True)


def test_primitive_specs_are_built_once_per_layer_spec():
    """The layers read these on every call and step: each is built once and cached."""
    b = S.bmojo(8, 2, 4, chunk=4, select=2, capacity=3)
    assert b.readout is b.readout and b.store is b.store and b.fading_block is b.fading_block
    assert b.readout.store is b.store
    assert b.fading_block.scan is b.fading_block.scan
    for spec in (S.mosaic(8, 2), S.persistent(8, 2, 3)):
        assert spec.leaky is spec.leaky and spec.readout is spec.readout
    assert {S.transformer(8, 2).layer, S.bmojo_f(8, 2, 4).layer, b.layer} == {"windowed"}
    assert (S.mamba(8).layer, S.mosaic(8, 2).layer, S.persistent(8, 2, 3).layer) == (
        "mamba", "mosaic", "persistent")
