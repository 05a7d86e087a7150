"""A sweep's runs across commands: an interrupted run of a resumable task (moons, regbench)
resumes from its last checkpoint and ends where an uninterrupted run ends; an interrupted run
of another configuration is refused by name."""

import json

import pytest

from memcore import cli
from memcore.tasks import train as train_loop

REGBENCH = ["regbench", "--steps", "6", "--batch", "2", "--train-dfas", "4", "--val-dfas", "3",
            "--test-dfas", "3", "--max-string-len", "4", "--d-model", "16", "--models",
            "transformer", "--lrs", "1e-3", "3e-3", "--seed", "0", "--eval-every", "2",
            "--log-every", "0"]
MOONS = ["moons", "--steps", "4", "--batch", "2", "--length", "40", "--eval-sequences", "2",
         "--context-step", "6", "--val-sequences", "3", "--lrs", "1e-2", "3e-2", "--seeds", "5",
         "--log-every", "0"]
# (argv, the runs, the first run's folder, the step index the kill comes at, the steps
# checkpointed before it)
CASES = {"regbench": (REGBENCH, 2, "transformer/lr0.001-seed0", 5, 4),
         "moons": (MOONS, 4, "1_head/lr0.01-seed5", 3, 3)}


class Killed(Exception):
    pass


def trained_steps(monkeypatch, kill_at=None):
    """Record the step indices the torch loop trains (each step reads its rate, once per
    parameter group); raise ``Killed`` at ``kill_at``, as a kill would stop the command there."""
    seen, lr_at = [], train_loop.lr_at

    def spy(step, cfg):
        if step == kill_at:
            raise Killed
        if not seen or seen[-1] != step:
            seen.append(step)
        return lr_at(step, cfg)
    monkeypatch.setattr(train_loop, "lr_at", spy)
    return seen


def results(out):
    res = json.loads((out / "results.json").read_text())
    return {m: [{k: v for k, v in r.items() if k != "seconds"} for r in line["runs"]]
            for m, line in res["models"].items()}


def step_records(path):
    return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "test", "test_tvd")}
            for line in path.read_text().splitlines()]


@pytest.mark.parametrize("task", sorted(CASES))
def test_an_interrupted_run_resumes_where_it_stopped(task, tmp_path, monkeypatch, capsys):
    argv, n_runs, first, kill_at, checkpointed = CASES[task]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert cli.main([*argv, "--out", str(whole)]) == 0
    with monkeypatch.context() as m:
        trained_steps(m, kill_at)
        with pytest.raises(Killed):
            cli.main([*argv, "--out", str(split)])
    assert not (split / first / "run.json").exists()
    assert (split / first / "checkpoint.safetensors").exists()
    capsys.readouterr()
    with monkeypatch.context() as m:
        seen = trained_steps(m)
        assert cli.main([*argv, "--out", str(split)]) == 0
        steps = int(argv[argv.index("--steps") + 1])
        # the first run trains only the steps after its checkpoint, the others all of them
        assert seen == [*range(checkpointed, steps), *list(range(steps)) * (n_runs - 1)]
    assert f"resumed from {split / first / 'checkpoint.safetensors'}" in capsys.readouterr().err
    assert results(split) == results(whole)
    if task == "regbench":  # the log holds each step once, as the uninterrupted run's
        assert step_records(split / first / "log.jsonl") == \
            step_records(whole / first / "log.jsonl")


def test_an_interrupted_run_of_another_configuration_is_refused(tmp_path, monkeypatch, capsys):
    out = tmp_path / "rb"
    with monkeypatch.context() as m:
        trained_steps(m, kill_at=3)
        with pytest.raises(Killed):
            cli.main([*REGBENCH, "--out", str(out)])
    capsys.readouterr()
    width = REGBENCH.index("--d-model") + 1
    assert cli.main([*REGBENCH[:width], "32", *REGBENCH[width + 1:], "--out", str(out)]) == 2
    assert "task.d_model differs from the run under" in capsys.readouterr().err
