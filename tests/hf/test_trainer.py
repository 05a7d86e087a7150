"""A few steps of transformers.Trainer on CPU lower a tiny model's loss."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="memcore.hf needs transformers (memcore[hf])")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (memcore[hf])")

V, T = 16, 12


class Counting(torch.utils.data.Dataset):
    """Rows that count up modulo V with a step of 1, 2 or 3: learnable in a few steps."""

    def __len__(self):
        return 48

    def __getitem__(self, i):
        ids = (torch.arange(T) * (1 + i % 3) + i) % V
        return {"input_ids": ids, "labels": ids.clone()}


def test_trainer_lowers_the_loss(tmp_path):
    from transformers import Trainer, TrainingArguments

    import memcore
    from memcore.hf import MemcoreConfig, MemcoreForCausalLM

    S = memcore.spec
    spec = S.model([S.mamba(16, d_state=4), S.transformer(16, 2, window=4)], vocab_size=V)
    model = MemcoreForCausalLM(MemcoreConfig(spec=spec))
    data = Counting()
    batch = {k: torch.stack([data[i][k] for i in range(12)]) for k in ("input_ids", "labels")}
    with torch.no_grad():
        before = model(**batch).loss.item()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=12, learning_rate=1e-2,
                             per_device_train_batch_size=8, use_cpu=True, report_to=[],
                             save_strategy="no", logging_strategy="no", disable_tqdm=True,
                             dataloader_num_workers=0, seed=0)
    Trainer(model=model, args=args, train_dataset=data).train()
    with torch.no_grad():
        after = model.eval()(**batch).loss.item()
    assert after < 0.75 * before, (before, after)
