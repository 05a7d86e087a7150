"""Helpers the torch and JAX training-loop tests share."""

import numpy as np
import pytest

from memcore.tasks.train import TrainConfig


class _Stop(Exception):
    pass


@pytest.fixture
def interrupted_and_resumed(tmp_path):
    """``run(train, make_model, batch_fn, cfg)``: trains ``make_model()`` whole, again until an
    interruption inside step 4 (after the checkpoint at step 3), then resumes that run from its
    checkpoint on ``make_model(seed=9)`` (another initialisation proves that the checkpoint
    restores the parameters). Checks that the resumed run's losses are the whole run's;
    returns (whole, resumed)."""

    def run(train, make_model, batch_fn, cfg: dict):
        whole = train(make_model(), batch_fn, TrainConfig(out_dir=str(tmp_path / "a"), **cfg),
                      quiet=True)

        def interrupted(step):
            if step == 4:
                raise _Stop
            return batch_fn(step)

        out = str(tmp_path / "b")
        with pytest.raises(_Stop):
            train(make_model(), interrupted, TrainConfig(out_dir=out, **cfg), quiet=True)
        resumed = train(make_model(seed=9), batch_fn, TrainConfig(out_dir=out, **cfg),
                        resume=True, quiet=True)
        assert len(whole["losses"]) == len(resumed["losses"]) == cfg["steps"]
        np.testing.assert_array_equal(resumed["losses"], whole["losses"])
        return whole, resumed

    return run
