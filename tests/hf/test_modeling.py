"""MemcoreForCausalLM's forward: the loss, the aux loss, masks, a cache fed in pieces, and
clear errors for what it does not take."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers", reason="memcore.hf needs transformers (memcore[hf])")


def test_labels_give_the_shifted_loss_and_the_output_carries_the_cache(hf_model, tokens):
    from memcore.hf import MemcoreCache

    model = hf_model("jamba")
    ids = tokens(2, 9)
    labels = ids.clone()
    labels[0, 3] = labels[1, 7] = -100
    out = model(ids, labels=labels, use_cache=True)
    with torch.no_grad():
        logits = model.model(ids)[0]
    want = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                           labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-12)
    # A trainer's token count across accumulation steps: the sum over that count.
    summed = model(ids, labels=labels, num_items_in_batch=torch.tensor(7)).loss
    torch.testing.assert_close(summed, want * 14 / 7, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=0)
    assert isinstance(out.cache, MemcoreCache) and out.cache.get_seq_length() == 9
    assert out.aux_loss is None
    loss, logits_t, cache = model(ids, labels=labels, use_cache=True, return_dict=False)
    assert torch.equal(loss, out.loss) and isinstance(cache, MemcoreCache)
    out.loss.backward()
    assert model.model.embed.weight.grad is not None


def test_aux_loss_weight_adds_the_innovation_loss(hf_model, tokens):
    ids = tokens(2, 12)
    plain = hf_model("bmojo")
    weighted = hf_model("bmojo", aux_loss_weight=0.5)
    a = plain(ids, labels=ids)
    b = weighted(ids, labels=ids)
    with torch.no_grad():
        aux = plain.model.forward_aux(ids)[2]
    torch.testing.assert_close(a.aux_loss, aux, rtol=1e-12, atol=1e-12)
    assert float(aux) > 0
    torch.testing.assert_close(b.loss, a.loss + 0.5 * aux, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["transformer", "bmojo"])
def test_masked_tokens_change_nothing(kind, hf_model, tokens):
    """Right padding (batched when no layer has an aux loss) and holes in the mask: every row
    equals that row's unmasked tokens alone; masked positions get zero logits."""
    model = hf_model(kind)
    ids = tokens(3, 10, seed=1)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # right padding
    mask[1, 2:4] = 0  # a hole
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=False)
        for b in range(3):
            keep = mask[b] == 1
            alone = model.model(ids[b, keep][None])[0][0]
            torch.testing.assert_close(out.logits[b, keep], alone, rtol=1e-9, atol=1e-9)
            assert torch.equal(out.logits[b, ~keep], torch.zeros_like(out.logits[b, ~keep]))
    if kind == "bmojo":  # the aux loss is the mean over the unmasked tokens
        auxes = [model.model.forward_aux(ids[b, mask[b] == 1][None])[2] for b in range(3)]
        n = mask.sum(1).double()
        torch.testing.assert_close(out.aux_loss, (torch.stack(auxes) * n).sum() / n.sum(),
                                   rtol=1e-12, atol=1e-12)


def test_a_stream_fed_in_pieces_equals_the_whole(hf_model, tokens):
    """Pieces of a masked stream through one cache (a multi-token piece, single tokens, a hole
    after the state exists) give the logits of the unmasked tokens run at once."""
    from memcore.hf import MemcoreCache

    model = hf_model("bmojo")
    ids = tokens(2, 16, seed=2)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, 9] = 0
    cache = MemcoreCache()
    pieces = []
    with torch.no_grad():
        for a, b in ((0, 6), (6, 7), (7, 8), (8, 14)):
            pieces.append(model(ids[:, a:b], attention_mask=mask[:, :b], cache=cache).logits)
        pieces.append(model(ids[:, 14:], cache=cache).logits)  # no mask: every token is used
        got = torch.cat(pieces, 1)
        for r in range(2):
            keep = mask[r] == 1
            alone = model.model(ids[r, keep][None])[0][0]
            torch.testing.assert_close(got[r, keep], alone, rtol=1e-9, atol=1e-9)
    assert cache.get_seq_length() == 16 and cache.real_counts() == [13, 15]


def test_a_batched_cache_continues_exactly(hf_model, tokens):
    from memcore.hf import MemcoreCache

    model = hf_model("mosaic")
    ids = tokens(2, 11, seed=3)
    cache = MemcoreCache()
    with torch.no_grad():
        got = torch.cat([model(ids[:, :5], cache=cache).logits,
                         model(ids[:, 5:6], cache=cache).logits,
                         model(ids[:, 6:], cache=cache).logits], 1)
        want = model.model(ids)[0]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert cache.rows is None and cache.get_seq_length() == 11


def test_bad_arguments_are_refused_by_name(hf_model, tokens):
    from memcore.hf import MemcoreCache

    model = hf_model("transformer")
    ids = tokens(2, 5)
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=torch.zeros(2, 5, 16))
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, position_ids=torch.arange(5)[None])
    with pytest.raises(TypeError, match="token_type_ids"):
        model(ids, token_type_ids=torch.zeros_like(ids))
    with pytest.raises(ValueError, match="output_hidden_states"):
        model(ids, output_hidden_states=True)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, labels=ids, logits_to_keep=1)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, logits_to_keep=-1)
    with pytest.raises(TypeError, match="cache must be a MemcoreCache"):
        model(ids, cache=object())
    with pytest.raises(ValueError, match="input_ids"):
        model(ids[0])
    with pytest.raises(ValueError, match=r"attention_mask must have shape .*\(2, 5\)"):
        model(ids, attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must hold only 0"):
        model(ids, attention_mask=torch.full_like(ids, 2))
    cache = MemcoreCache()
    model(ids, cache=cache)
    with pytest.raises(ValueError, match="attention_mask: its first 5 columns"):
        model(ids[:, :1], cache=cache,
              attention_mask=torch.tensor([[1, 1, 0, 1, 1, 1], [1] * 6]))
    with pytest.raises(ValueError, match="batch of 2"):
        model(tokens(3, 1), cache=cache)
    with pytest.raises(ValueError, match="tokens must lie in"):
        model(torch.full((1, 3), 32))
