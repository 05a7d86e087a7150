"""generate() on every realization kind: each new token and its logits are those of the full
parallel form on the sequence so far; padding, beams and a cache carried between calls."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="memcore.hf needs transformers (memcore[hf])")

KINDS = ("mamba", "transformer", "transformer_window", "bmojo_f", "bmojo", "mosaic", "jamba")
P, N = 10, 8  # prompt length, new tokens: past the window (4) and several store chunks (4)


def _full_logits(model, seq):
    """The parallel form's logits on the whole sequence, rounded as generate rounds them."""
    with torch.no_grad():
        return model.model(seq)[0].float()


def _generate(model, ids, **kw):
    kw.setdefault("attention_mask", torch.ones_like(ids))
    return model.generate(ids, max_new_tokens=N, return_dict_in_generate=True,
                          output_logits=True, pad_token_id=0, **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_is_the_parallel_argmax(kind, hf_model, tokens):
    model = hf_model(kind)
    ids = tokens(2, P)
    out = _generate(model, ids, do_sample=False)
    seq = out.sequences
    assert seq.shape == (2, P + N) and torch.equal(seq[:, :P], ids)
    full = _full_logits(model, seq)
    assert torch.equal(full[:, P - 1:-1].argmax(-1), seq[:, P:])
    steps = torch.stack(out.logits, 1)
    torch.testing.assert_close(steps, full[:, P - 1:-1], rtol=1e-6, atol=1e-6)
    assert len(set(seq[:, P:].flatten().tolist())) > 2  # the continuation is not one token


@pytest.mark.parametrize("kind", ["bmojo", "jamba"])
def test_sampling_reads_the_same_logits(kind, hf_model, tokens):
    model = hf_model(kind)
    ids = tokens(3, P, seed=1)
    torch.manual_seed(0)
    out = _generate(model, ids, do_sample=True, top_k=0, temperature=1.5)
    full = _full_logits(model, out.sequences)
    torch.testing.assert_close(torch.stack(out.logits, 1), full[:, P - 1:-1], rtol=1e-6,
                               atol=1e-6)
    torch.manual_seed(0)
    again = _generate(model, ids, do_sample=True, top_k=0, temperature=1.5)
    assert torch.equal(again.sequences, out.sequences)
    greedy = _generate(model, ids, do_sample=False).sequences
    assert not torch.equal(greedy, out.sequences)


@pytest.mark.parametrize("kind", ["bmojo", "jamba"])
def test_left_padding_is_exact(kind, hf_model, tokens):
    """Each row of a left-padded batch continues as it would alone: pads enter no state."""
    model = hf_model(kind)
    ids = tokens(3, P, seed=2)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, :1] = 0
    ids = ids.masked_fill(mask == 0, 0)
    out = _generate(model, ids, attention_mask=mask, do_sample=False)
    steps = torch.stack(out.logits, 1)
    for b in range(3):
        alone = ids[b, mask[b] == 1][None]
        one = _generate(model, alone, do_sample=False)
        assert torch.equal(out.sequences[b, P:], one.sequences[0, alone.shape[1]:])
        torch.testing.assert_close(steps[b], torch.stack(one.logits, 1)[0], rtol=1e-6,
                                   atol=1e-6)


@pytest.mark.parametrize("kind", ["transformer", "bmojo"])
def test_beam_scores_are_the_parallel_log_probs(kind, hf_model, tokens):
    """Beam search reorders the cache: every returned beam's score is its log-probability
    under the parallel form."""
    model = hf_model(kind)
    ids = tokens(2, P, seed=3)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                         num_beams=3, num_return_sequences=2, do_sample=False,
                         length_penalty=0.0, return_dict_in_generate=True, output_scores=True,
                         pad_token_id=0)
    seq = out.sequences
    with torch.no_grad():
        logp = torch.log_softmax(model.model(seq)[0], -1)
    score = logp[:, P - 1:-1].gather(-1, seq[:, P:, None])[..., 0].sum(-1)
    torch.testing.assert_close(out.sequences_scores, score.float(), rtol=1e-5, atol=1e-5)


def test_generate_continues_from_a_returned_cache(hf_model, tokens):
    model = hf_model("bmojo")
    ids = tokens(2, P, seed=4)
    whole = _generate(model, ids, do_sample=False).sequences
    first = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                           do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    cache = first.cache
    # It has seen the prompt and every new token but the last.
    assert cache.get_seq_length() == P + 2
    rest = model.generate(first.sequences, attention_mask=torch.ones_like(first.sequences),
                          cache=cache, max_new_tokens=N - 3, do_sample=False, pad_token_id=0)
    assert torch.equal(rest, whole)


def test_cache_rows_are_selected_and_repeated_exactly(hf_model, tokens):
    """batch_select_indices (beam reordering) with a repeated row: each copy runs on."""
    from memcore.hf import MemcoreCache

    model = hf_model("bmojo")
    ids = tokens(2, P, seed=5)
    nxt = tokens(3, 5, seed=6)
    with torch.no_grad():
        cache = MemcoreCache()
        model(ids, cache=cache)
        cache.batch_select_indices(torch.tensor([1, 1, 0]))
        got = torch.cat([model(nxt[:, t:t + 1], cache=cache).logits for t in range(5)], 1)
        want = model(torch.cat([ids[[1, 1, 0]], nxt], 1)).logits[:, P:]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="cannot forget"):
        cache.crop(2)
