"""The ``memcore`` command line.

    memcore verify [--targets T ...] [--cases C ...] [-v]     the contract's checks, as a table
    memcore info                                               version, backends, libraries
    memcore mqar [--quick] [--out DIR] [--models M ...]        multi-query associative recall
    memcore lm --text FILE [--out DIR] [--models M ...]        byte-level LM, loss up to 4L
    memcore moons [--out DIR]                                  Memory Mosaics' three moons
    memcore regbench [--out DIR] [--models M ...]              in-context language learning
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys


def _format_table(rows) -> tuple[str, bool]:
    """One line per (case, target), a column per check with its worst error."""
    checks = ["forms", "split", "vs reference"]
    order: list[tuple[str, str]] = []
    cells: dict[tuple[str, str], dict[str, str]] = {}
    ok = True
    for r in rows:
        key = (r.case, r.target)
        if key not in cells:
            order.append(key)
            cells[key] = {}
        if r.status in ("skipped", "error"):
            cells[key]["note"] = f"{r.status}: {r.detail}"
            ok = ok and r.status == "skipped"
            continue
        mark = "" if r.status == "ok" else " FAIL"
        cells[key][r.check] = f"{r.error:.1e}{mark}"
        ok = ok and r.status == "ok"
    w_case = max([len("realization")] + [len(k[0]) for k in order])
    w_target = max([len("target")] + [len(k[1]) for k in order])
    head = f"{'realization':<{w_case}}  {'target':<{w_target}}  " + "  ".join(
        f"{c:<12}" for c in checks)
    lines = [head, "-" * len(head)]
    for key in order:
        c = cells[key]
        if "note" in c:
            body = c["note"]
        else:
            body = "  ".join(f"{c.get(name, '-'):<12}" for name in checks)
        lines.append(f"{key[0]:<{w_case}}  {key[1]:<{w_target}}  {body}".rstrip())
    return "\n".join(lines), ok


def _summary(rows) -> str:
    worst: dict[str, tuple[float, float]] = {}
    for r in rows:
        if r.status in ("ok", "FAIL"):
            err, tol = worst.get(r.target, (0.0, r.tolerance))
            worst[r.target] = (max(err, r.error), r.tolerance)
    return "\n".join(f"worst error on {t}: {e:.2e} (tolerance {tol:.0e})"
                     for t, (e, tol) in worst.items())


def cmd_verify(args) -> int:
    from memcore.testing.verification import CASES, TARGETS, verify

    if args.cases:
        unknown = sorted(set(args.cases) - set(CASES))
        if unknown:
            print(f"memcore verify: --cases must be among {sorted(CASES)}, got {unknown}",
                  file=sys.stderr)
            return 2
    cases = {k: v for k, v in CASES.items() if not args.cases or k in args.cases}
    targets = args.targets or TARGETS
    log = (lambda msg: print(msg, file=sys.stderr)) if args.verbose else None
    print(f"memcore verify: {len(cases)} realizations x {len(targets)} targets, float64, "
          f"on {platform.machine()} {platform.system()}, Python {platform.python_version()}")
    rows = verify(targets=targets, cases=cases, log=log)
    table, ok = _format_table(rows)
    print(table)
    print()
    print(_summary(rows))
    print("all checks within tolerance" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


def cmd_info(args) -> int:
    import memcore

    print(f"memcore {memcore.__version__}, Python {platform.python_version()}, "
          f"{platform.machine()} {platform.system()}")
    print("backends:", ", ".join(memcore.available_backends()))
    for lib in ("numpy", "torch", "jax", "equinox", "triton", "mamba_ssm"):
        found = importlib.util.find_spec(lib) is not None
        version = ""
        if found:
            try:
                version = getattr(__import__(lib), "__version__", "")
            except Exception as err:  # an installed but broken library is worth reporting
                version = f"(import fails: {err})"
        print(f"  {lib:<10} {version if found else 'not installed'}")
    return 0


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


def cmd_mqar(args) -> int:
    from memcore.tasks import mqar_run

    overrides = {"steps": args.steps, "seq_len": args.seq_len, "num_kv_pairs": args.kv,
                 "vocab_size": args.vocab, "d_model": args.d_model, "batch_size": args.batch,
                 "test_examples": args.test_examples, "lr": args.lr}

    def run():
        mqar_run.check_models(args.models)
        if args.dry_run:
            plan = mqar_run.full_plan(args.models) if not args.quick else \
                [(m, mqar_run.QUICK) for m in args.models]
            print(f"memcore mqar: {len(plan)} training runs planned")
            for name, cfg in plan:
                print(f"  {name} L={cfg.seq_len} kv={cfg.num_kv_pairs} d={cfg.d_model} "
                      f"lr={cfg.lr:.2e} steps={cfg.total_steps}")
            return None
        return mqar_run.run(args.models, quick=args.quick, seed=args.seed, device=args.device,
                            out_dir=args.out, overrides=overrides, resume=args.resume,
                            checkpoint_every=args.checkpoint_every, backend=args.backend,
                            log_every=args.log_every, jobs=args.jobs)

    return run_task_command("mqar", run, mqar_run.table, args.out,
                            TASK_ERRORS + (FileNotFoundError,))


def cmd_lm(args) -> int:
    from memcore.tasks import lm

    fields = {"seq_len": args.seq_len, "d_model": args.d_model, "batch_size": args.batch,
              "steps": args.steps, "lr": args.lr, "eval_windows": args.eval_windows}

    def run():
        return lm.run(args.text, args.models, _config(lm.LMConfig(), fields), seed=args.seed,
                      device=args.device, out_dir=args.out, backend=args.backend,
                      log_every=args.log_every, resume=args.resume,
                      checkpoint_every=args.checkpoint_every)

    return run_task_command("lm", run, lm.table, args.out, TASK_ERRORS + (FileNotFoundError,))


def cmd_moons(args) -> int:
    from memcore.tasks import moons

    fields = {"steps": args.steps, "batch_size": args.batch, "length": args.length,
              "eval_sequences": args.eval_sequences, "context_step": args.context_step}

    def run():
        return moons.run(_config(moons.MoonsConfig(), fields), heads=tuple(args.heads),
                         seed=args.seed, device=args.device, out_dir=args.out,
                         backend=args.backend, log_every=args.log_every)

    def report(results):
        return (f"held out: {results['held_out']}; trained on "
                f"{', '.join(results['train_sets'])}\n" + moons.table(results))

    return run_task_command("moons", run, report, args.out)


def cmd_regbench(args) -> int:
    from memcore.tasks import regbench

    fields = {"steps": args.steps, "batch_size": args.batch, "train_dfas": args.train_dfas,
              "test_dfas": args.test_dfas, "max_string_len": args.max_string_len,
              "d_model": args.d_model}

    def run():
        return regbench.run(args.models, _config(regbench.RegBenchConfig(), fields),
                            seed=args.seed, device=args.device, out_dir=args.out,
                            backend=args.backend, log_every=args.log_every)

    return run_task_command("regbench", run, regbench.table, args.out)


def _run_args(p, out_help: str, seed: int = 0, seed_help: str | None = None,
              checkpoints: bool = True, log_help: str | None = None) -> None:
    """Options every training task shares, up to --log-every."""
    p.add_argument("--out", metavar="DIR", help=out_help)
    p.add_argument("--seed", type=int, default=seed, help=seed_help)
    p.add_argument("--device", default="cpu",
                   help="cpu (default) or cuda[:N], for either backend")
    p.add_argument("--backend", default="torch",
                   help="torch (default) or jax (needs jax, equinox, optax)")
    if checkpoints:
        p.add_argument("--resume", action="store_true",
                       help="continue from the checkpoints under --out")
        p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                       help="checkpoint every N steps (0: never)")
    p.add_argument("--log-every", type=int, default=50, metavar="N", help=log_help)


def _task_args(p) -> None:
    """The options of the tasks that checkpoint and resume."""
    _run_args(p, "write results, logs, checkpoints and plots here",
              log_help="a progress line on stderr every N steps")
    p.add_argument("--steps", type=int, help="training steps (overrides the configuration)")
    _threads_arg(p)


def _models_arg(p, models) -> None:
    p.add_argument("--models", nargs="+", default=list(models), metavar="MODEL",
                   help=f"default: all of {', '.join(models)}")


def _sizes_args(p, **helps) -> None:
    """One option per configuration size, ``--seq-len`` for ``seq_len=help``: ints, ``lr`` a
    float; absent, the configuration's value stands."""
    for dest, text in helps.items():
        p.add_argument("--" + dest.replace("_", "-"), type=float if dest == "lr" else int,
                       help=text)


def _threads_arg(p) -> None:
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads (default: torch's choice; 1 is often fastest on a "
                        "busy machine); torch backend only")


def build_parser() -> argparse.ArgumentParser:
    from memcore.testing.verification import CASES, TARGETS

    parser = argparse.ArgumentParser(prog="memcore", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("verify", help="check every realization on every installed target")
    p.add_argument("--targets", nargs="+", choices=TARGETS, help="default: all")
    p.add_argument("--cases", nargs="+", metavar="CASE",
                   help=f"default: all of {', '.join(CASES)}")
    p.add_argument("-v", "--verbose", action="store_true", help="timings and tracebacks")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("info", help="version, registered backends, installed libraries")
    p.set_defaults(func=cmd_info)

    from memcore.tasks.mqar_run import MODELS

    p = sub.add_parser("mqar", help="multi-query associative recall (Zoology's protocol)")
    p.add_argument("--quick", action="store_true",
                   help="the reduced CPU configuration (default: Zoology's Figure-2 sweep)")
    _models_arg(p, MODELS)
    _task_args(p)
    _sizes_args(p, seq_len="sequence length L", kv="key-value pairs per sequence",
                vocab="vocabulary size", d_model="model width", batch="batch size",
                lr="learning rate", test_examples="examples in the test set")
    p.add_argument("--dry-run", action="store_true", help="list the planned runs and stop")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train N models at a time, each in its own single-thread process "
                        "(jax: XLA's multi-threaded Eigen off)")
    p.set_defaults(func=cmd_mqar)

    from memcore.tasks.lm import MODELS as LM_MODELS

    p = sub.add_parser("lm", help="byte-level language model on a text file; loss up to 4L")
    p.add_argument("--text", required=True, metavar="FILE", help="any text file")
    _models_arg(p, LM_MODELS)
    _task_args(p)
    _sizes_args(p, seq_len="training length L (evaluation: 4L)", d_model="model width",
                batch="batch size", lr="learning rate", eval_windows="held-out windows of 4L bytes")
    p.set_defaults(func=cmd_lm)

    p = sub.add_parser("moons", help="Memory Mosaics' three moons: 1 head vs 3 heads")
    p.add_argument("--heads", nargs="+", type=int, default=[1, 3], help="default: 1 3")
    _run_args(p, "write results and the plot here", seed=100,
              seed_help="default: 100 (the paper's)", checkpoints=False)
    _sizes_args(p, steps="training steps (default 500)", batch="batch size (default 64)",
                length="sequence length (default 800)",
                eval_sequences="sequences per evaluated set",
                context_step="spacing of evaluated context lengths")
    _threads_arg(p)
    p.set_defaults(func=cmd_moons)

    from memcore.tasks.regbench import MODELS as RB_MODELS

    p = sub.add_parser("regbench", help="in-context language learning on random automata")
    _models_arg(p, RB_MODELS)
    _run_args(p, "write results and the plot here", checkpoints=False)
    _sizes_args(p, steps="training steps (default 400)", batch="batch size (default 16)",
                train_dfas="training automata (default 1000)",
                test_dfas="test automata (default 100)",
                max_string_len="longest string (default 49)", d_model="model width (default 64)")
    _threads_arg(p)
    p.set_defaults(func=cmd_regbench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    threads = getattr(args, "threads", None)
    if threads is not None:
        if getattr(args, "backend", "torch") == "jax":
            # XLA sizes its own thread pool when JAX starts; ignoring the option would differ
            # silently from what was asked.
            print(f"memcore {args.command}: --threads sets torch's CPU threads; it has no "
                  f"effect under --backend jax (leave it out)", file=sys.stderr)
            return 2
        if threads < 1:
            print(f"memcore {args.command}: --threads must be >= 1, got {threads}",
                  file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(threads)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
