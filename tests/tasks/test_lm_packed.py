"""`memcore lm --packed`: documents cut at blank lines, rows of whole documents whose
cu_seqlens are the documents' boundaries, labels that never cross a boundary, the packed loss
equal to the documents' separate losses, a tiny run end to end, and the refusals."""

import json
import os

import numpy as np
import pytest
import torch

from memcore import cli
from memcore import spec as S
from memcore.tasks import lm, packing
from memcore.tasks.mqar import IGNORE
from memcore.tasks.stack import task_model

SHAKESPEARE = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data",
                           "tinyshakespeare.txt")
TINY = ["--seq-len", "8", "--d-model", "16", "--batch", "4", "--steps", "2", "--eval-every",
        "1", "--eval-windows", "12", "--val-windows", "6", "--log-every", "1"]


def _bytes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), dtype=np.uint8).astype(np.int64)


def test_documents_are_the_text_cut_at_blank_lines():
    docs = packing.documents(_bytes("first doc\nline two\n\nsecond\n\n\n\nx\n\nthird one"))
    assert [bytes(d.astype(np.uint8)).decode() for d in docs] == [
        "first doc\nline two", "second", "third one"]  # "x" has no next-byte target


def test_rows_hold_whole_documents_and_their_cu_seqlens():
    docs = [_bytes(t) for t in ("abcde", "fg", "hijklmn", "op", "qrstuvwxyz0123456789")]
    row = 16
    seen_cut = False
    for step in range(40):
        tokens, labels, cu, used = packing.pack_row(docs, row, np.random.default_rng([3, step]))
        assert tokens.shape == labels.shape == (1, row) and cu.dtype == np.int32
        assert cu[0] == 0 and cu[-1] == row and np.all(np.diff(cu) > 0)
        for k, i in enumerate(used):
            a, b = int(cu[k]), int(cu[k + 1])
            d = docs[i]
            if len(d) > row:  # longer than the row: cut to it, alone in its row
                assert (a, b) == (0, row) and len(used) == 1
                seen_cut = True
            else:  # every other document whole
                assert b - a == len(d)
            np.testing.assert_array_equal(tokens[0, a:b], d[:b - a])
            # the target of position t is token t + 1 of the same document; none at its end
            np.testing.assert_array_equal(labels[0, a:b - 1], tokens[0, a + 1:b])
            assert labels[0, b - 1] == IGNORE
        if len(cu) - 1 > len(used):  # the padding segment: never labelled
            assert np.all(labels[0, int(cu[-2]):] == IGNORE)
    assert seen_cut
    with pytest.raises(ValueError, match="no document of at least 2 bytes"):
        packing.pack_row([], row, np.random.default_rng(0))


def test_no_loss_term_crosses_a_boundary():
    """The packed loss is the token-weighted mean of each document's loss run alone."""
    spec = S.model([S.bmojo(8, 2, window=3, chunk=4, select=2, capacity=3, d_state=2),
                    S.mamba(8, d_state=2)], 256, ffn="mlp", mlp_ratio=2, short_conv=3)
    model = task_model("torch", spec, 0)
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 256, n) for n in (5, 9, 3, 7)]
    tokens, labels, cu, used = packing.pack_row(docs, 24, np.random.default_rng(2))
    assert len(used) >= 2  # the row holds a boundary
    loss = packing.packed_loss(0.0)
    with torch.no_grad():
        _, ce = loss(model, torch.as_tensor(tokens), torch.as_tensor(labels),
                     torch.as_tensor(cu))
        total, n = 0.0, 0
        for i in used:
            d = torch.as_tensor(docs[i])[None]
            logits = model(d[:, :-1])
            total += float(torch.nn.functional.cross_entropy(
                logits[0].float(), d[0, 1:], reduction="sum"))
            n += d.shape[1] - 1
        # and without cu_seqlens the same row reads across the boundaries: another loss
        mask = torch.as_tensor(labels != IGNORE)
        unpacked = torch.nn.functional.cross_entropy(
            model(torch.as_tensor(tokens), mask).float(), torch.as_tensor(labels)[mask])
    assert float(ce) == pytest.approx(total / n, rel=1e-5)
    assert abs(float(unpacked) - total / n) > 1e-4


@pytest.fixture
def text(tmp_path):
    if not os.path.isfile(SHAKESPEARE):
        pytest.skip(f"tinyshakespeare not found at {SHAKESPEARE}")
    path = tmp_path / "slice.txt"
    path.write_bytes(open(SHAKESPEARE, "rb").read()[:8000])
    return str(path)


def test_packed_tiny_run(text, tmp_path, capsys):
    out = tmp_path / "lm"
    argv = ["lm", "--text", text, "--models", "bmojo", *TINY, "--lr", "1e-3", "--seed", "0",
            "--packed", "--out", str(out)]
    assert cli.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["packed"] is True
    assert any(d.startswith("packed training rows: batch 1 of 32 bytes")
               for d in res["deviations"])
    r = res["models"]["bmojo"]
    assert np.isfinite(r["loss_within_L"]) and r["train_loss"] > 0
    capsys.readouterr()
    # the unpacked run is another configuration: refused under the same folder, by name
    assert cli.main([a for a in argv if a != "--packed"]) == 2
    assert "packed differs" in capsys.readouterr().err


def test_packed_refuses_jax(text, capsys):
    pytest.importorskip("jax")
    assert cli.main(["lm", "--text", text, *TINY, "--packed", "--backend", "jax"]) == 2
    assert "--packed needs --backend torch" in capsys.readouterr().err
    with pytest.raises(ValueError, match="packed must be a bool"):
        lm.LMConfig(packed=1)


def test_an_unpacked_run_records_its_config_as_before():
    assert "packed" not in lm.config_record(lm.LMConfig())
    assert lm.config_record(lm.LMConfig(packed=True))["packed"] is True
