"""The task subcommands of ``memcore`` (mqar, lm, moons, regbench): each turns its parsed
arguments into a task's configuration and runs it; ``memcore.cli`` builds the parser."""

from __future__ import annotations

import sys

TASK_ERRORS = (ValueError, TypeError, NotImplementedError)


def run_task_command(name: str, fn, report, out, errors=TASK_ERRORS) -> int:
    """A task subcommand: ``fn()`` runs it and returns its results (None: nothing to report,
    as a dry run); an error of ``errors`` is a bad argument, printed as ``memcore NAME: ...``
    with exit status 2. Then ``report(results)``, the wall time and where the files went."""
    try:
        results = fn()
    except errors as err:
        print(f"memcore {name}: {err}", file=sys.stderr)
        return 2
    if results is None:
        return 0
    print(report(results))
    print(f"wall time {results['seconds']:.0f} s")
    if out:
        plot = results.get("plot")
        print(f"results in {out}/results.json" + (f", plot {plot}" if plot else ""))
    return 0


def _config(default, fields: dict):
    """``default`` with the fields given on the command line (None: not given)."""
    from dataclasses import replace

    return replace(default, **{k: v for k, v in fields.items() if v is not None})


def mqar_arguments(args) -> dict:
    """``mqar_configs.plan``'s and ``mqar_run.run``'s arguments from the command line: the mode, the
    configuration overrides, the swept lists (``--sweep memory``), the learning rates and seeds
    (``--lr`` and ``--seed`` are one-value forms of ``--lrs`` and ``--seeds``)."""
    if args.quick and args.sweep:
        raise ValueError("--quick and --sweep are two modes: give one of them")
    mode = "quick" if args.quick else (args.sweep or "full")
    overrides = {"steps": args.steps, "seq_len": args.seq_len, "num_kv_pairs": args.kv,
                 "vocab_size": args.vocab, "d_model": args.d_model, "batch_size": args.batch,
                 "val_examples": args.val_examples, "test_examples": args.test_examples,
                 "select": args.select, "chunk": args.chunk, "pattern": args.pattern,
                 "hybrid_window": args.hybrid_window}
    swept = {"window": args.window, "capacity": args.capacity, "d_state": args.d_state}
    if mode == "memory":
        swept = {k: v for k, v in swept.items() if v is not None}
    else:
        for key, values in swept.items():
            if values is not None and len(values) != 1:
                raise ValueError(f"--{key.replace('_', '-')} takes one value outside --sweep "
                                 f"memory, got {values}")
            overrides[key] = values[0] if values else None
        swept = {}
    for flag, one, many in (("lr", args.lr, args.lrs), ("seed", args.seed, args.seeds)):
        if one is not None and many is not None:
            raise ValueError(f"--{flag} and --{flag}s: give one of them")
    lrs = args.lrs or ([args.lr] if args.lr is not None else None)
    seeds = args.seeds or ([args.seed] if args.seed is not None else None)
    return {"models": args.models, "mode": mode, "overrides": overrides, "swept": swept,
            "lrs": lrs, "seeds": seeds}


def cmd_mqar(args) -> int:
    from memcore.tasks import mqar_configs, mqar_run

    def run():
        chosen = mqar_arguments(args)
        if args.dry_run:
            variants, sweep, cfg = mqar_configs.plan(**chosen)
            print(mqar_run.describe(variants, sweep, chosen["overrides"]))
            print("deviations from Zoology's protocol:")
            for dv in mqar_configs.deviations(cfg, sweep, chosen["models"], chosen["mode"]):
                print(f"  - {dv}")
            return None
        return mqar_run.run(**chosen, device=args.device, out_dir=args.out, resume=args.resume,
                            checkpoint_every=args.checkpoint_every, backend=args.backend,
                            log_every=args.log_every, jobs=args.jobs)

    return run_task_command("mqar", run, mqar_run.table, args.out,
                            TASK_ERRORS + (FileNotFoundError,))


def cmd_lm(args) -> int:
    from memcore.tasks import lm

    fields = {"seq_len": args.seq_len, "d_model": args.d_model, "batch_size": args.batch,
              "steps": args.steps, "eval_every": args.eval_every,
              "eval_windows": args.eval_windows, "val_windows": args.val_windows,
              "packed": args.packed or None}

    def run():
        return lm.run(args.text, args.models, _config(lm.LMConfig(), fields),
                      **sweep_arguments(args, lm.LRS, lm.SEEDS), device=args.device,
                      out_dir=args.out, backend=args.backend, log_every=args.log_every,
                      jobs=args.jobs)

    return run_task_command("lm", run, lm.table, args.out, TASK_ERRORS + (FileNotFoundError,))


def sweep_arguments(args, default_lrs, default_seeds) -> dict:
    """The learning rates and seeds of a task's sweep (moons, regbench, lm): ``--lrs`` and
    ``--seeds``, or their one-value forms ``--lr`` and ``--seed``; the task's protocol sweep
    where none is given."""
    for flag in ("lr", "seed"):
        if getattr(args, flag, None) is not None and getattr(args, flag + "s") is not None:
            raise ValueError(f"--{flag} and --{flag}s: give one of them")
    lr, seed = getattr(args, "lr", None), args.seed
    return {"lrs": args.lrs or ([lr] if lr is not None else list(default_lrs)),
            "seeds": args.seeds or ([seed] if seed is not None else list(default_seeds))}


def cmd_moons(args) -> int:
    from memcore.tasks import moons

    fields = {"steps": args.steps, "batch_size": args.batch, "length": args.length,
              "eval_sequences": args.eval_sequences, "context_step": args.context_step,
              "val_sequences": args.val_sequences, "set_order": args.set_order,
              "official_cache": args.official_cache or None}

    def run():
        return moons.run(_config(moons.MoonsConfig(), fields), heads=tuple(args.heads),
                         **sweep_arguments(args, moons.LRS, moons.SEEDS), device=args.device,
                         out_dir=args.out, backend=args.backend, log_every=args.log_every,
                         jobs=args.jobs)

    def report(results):
        return (f"held out: {results['held_out']}; trained on "
                f"{', '.join(results['train_sets'])}\n" + moons.table(results))

    return run_task_command("moons", run, report, args.out)


def cmd_regbench(args) -> int:
    from memcore.tasks import regbench

    fields = {"steps": args.steps, "epochs": args.epochs, "batch_size": args.batch,
              "train_dfas": args.train_dfas, "val_dfas": args.val_dfas,
              "test_dfas": args.test_dfas, "max_string_len": args.max_string_len,
              "d_model": args.d_model, "eval_every": args.eval_every}

    def run():
        return regbench.run(args.models, _config(regbench.RegBenchConfig(), fields),
                            **sweep_arguments(args, regbench.LRS, regbench.SEEDS),
                            device=args.device, out_dir=args.out, backend=args.backend,
                            log_every=args.log_every, jobs=args.jobs)

    return run_task_command("regbench", run, regbench.table, args.out)
