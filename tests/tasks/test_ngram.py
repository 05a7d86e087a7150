"""The Witten-Bell n-gram models on corpora small enough to compute by hand, and the in-context
model against the corpus model of each prefix."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memcore.tasks import ngram


def test_corpus_bigram_by_hand():
    # corpus "aab" over 4 symbols (a=0, b=1): unigrams a:2 b:1 (3 tokens, 2 types);
    # after a: a once, b once; after b: nothing
    m = ngram.CorpusNGram([0, 0, 1], order=2, vocab=4)
    uni = np.array([2 + 2 / 4, 1 + 2 / 4, 2 / 4, 2 / 4]) / 5
    after_a = (np.array([1, 1, 0, 0]) + 2 * uni) / 4
    p = np.exp(-m.nll([[0, 0], [0, 1], [0, 3], [1, 0], [3, 1]])[:, 0])
    np.testing.assert_allclose(p, [after_a[0], after_a[1], after_a[3], uni[0], uni[1]])
    # a window reads its own history only: its first position backs off to the unigram
    long = np.exp(-m.nll([[1, 0, 1]])[0])
    np.testing.assert_allclose(long, [uni[0], after_a[1]])
    assert np.allclose(sum(np.exp(-m.nll([[0, w]])[0, 0]) for w in range(4)), 1.0)


def test_trigram_interpolates_every_order():
    # corpus "abab": after "ab" comes a once; after "b" a once; after "a" b twice
    m = ngram.CorpusNGram([0, 1, 0, 1], order=3, vocab=3)
    uni = (np.array([2, 2, 0]) + 2 / 3) / 6
    after_b = (np.array([1, 0, 0]) + uni) / 2
    after_ab = (np.array([1, 0, 0]) + after_b) / 2
    p = np.exp(-m.nll([[0, 1, w] for w in range(3)])[:, 1])
    np.testing.assert_allclose(p, after_ab)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=2, max_size=14), st.integers(1, 4))
def test_in_context_is_the_corpus_model_of_each_prefix(tokens, order):
    got = ngram.in_context(tokens, order, vocab=4)
    assert got.shape == (len(tokens) - 1, 4)
    for i in range(len(tokens) - 1):
        m = ngram.CorpusNGram(tokens[:i + 1], order, vocab=4)
        window = np.array([tokens[:i + 1] + [w] for w in range(4)])
        want = np.exp(-m.nll(window)[:, i])
        np.testing.assert_allclose(got[i], want, rtol=1e-12, err_msg=f"position {i}")


def test_in_context_counts_only_targets_below_the_vocabulary():
    # 5 is a separator: history, never a prediction
    p = ngram.in_context([0, 5, 0], order=2, vocab=2)
    np.testing.assert_allclose(p[0], (np.array([1, 0]) + [0.5, 0.5]) / 2)
    np.testing.assert_allclose(p[1], p[0])  # "5" unseen as a history; "0" the only unigram


def test_bad_arguments():
    with pytest.raises(ValueError, match="order must be an int >= 1"):
        ngram.CorpusNGram([0, 1], order=0, vocab=2)
    with pytest.raises(TypeError, match="integer token ids"):
        ngram.CorpusNGram(np.array([0.0, 1.0]), order=2, vocab=2)
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\)"):
        ngram.CorpusNGram([0, 2], order=2, vocab=2)
    with pytest.raises(ValueError, match="does not fit"):
        ngram.CorpusNGram([0, 1], order=8, vocab=256)
    m = ngram.CorpusNGram([0, 1], order=2, vocab=2)
    with pytest.raises(ValueError, match=r"windows must be \[W, T \+ 1\]"):
        m.nll([0, 1])
