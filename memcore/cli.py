"""The ``memcore`` command line.

    memcore verify [--targets T ...] [--cases C ...] [-v]     the contract's checks, as a table
    memcore info                                               version, backends, libraries
    memcore mqar [--quick | --sweep memory] [--out DIR] ...    multi-query associative recall
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


def _task_args(p, seed: int | None = 0, seed_help: str | None = None) -> None:
    """The options of the tasks that checkpoint and resume."""
    _run_args(p, "write results, logs, checkpoints and plots here", seed=seed,
              seed_help=seed_help, log_help="a progress line on stderr every N steps")
    p.add_argument("--steps", type=int, help="training steps (overrides the configuration)")
    _threads_arg(p)


def _models_arg(p, models, default=None) -> None:
    default = models if default is None else default
    p.add_argument("--models", nargs="+", default=list(default), metavar="MODEL",
                   help=f"among {', '.join(models)}; default: {' '.join(default)}")


def _sizes_args(p, **helps) -> None:
    """One option per configuration size, ``--seq-len`` for ``seq_len=help``: ints, ``lr`` a
    float; absent, the configuration's value stands."""
    for dest, text in helps.items():
        p.add_argument("--" + dest.replace("_", "-"), type=float if dest == "lr" else int,
                       help=text)


def _sweep_args(p, seeds: str, lrs: str) -> None:
    """--lrs and --seeds of a task's protocol sweep."""
    p.add_argument("--lrs", nargs="+", type=float, metavar="LR",
                   help=f"learning rates swept for every model, chosen on validation "
                        f"(default {lrs})")
    p.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                   help=f"seeds of every (model, learning rate): mean +- std "
                        f"(default {seeds})")


def _jobs_arg(p) -> None:
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train N runs at a time, each in its own single-thread process")


def _threads_arg(p) -> None:
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads (default: torch's choice; 1 is often fastest on a "
                        "busy machine); torch backend only")


def build_parser() -> argparse.ArgumentParser:
    from memcore.tasks import commands
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

    from memcore.tasks.mqar_configs import MODELS

    p = sub.add_parser("mqar", help="multi-query associative recall (Zoology's protocol)")
    p.add_argument("--quick", action="store_true",
                   help="the reduced CPU configuration (default: Zoology's Figure-2 sweep)")
    p.add_argument("--sweep", choices=["memory"],
                   help="memory: accuracy against memory footprint, one curve per family "
                        "(the B'MOJO paper's figure); run family by family into one --out")
    _models_arg(p, MODELS)
    _task_args(p, seed=None, seed_help="one seed (the same as --seeds N)")
    _sizes_args(p, seq_len="sequence length L", kv="key-value pairs per sequence",
                vocab="vocabulary size", d_model="model width", batch="batch size",
                lr="one learning rate (the same as --lrs X)",
                val_examples="examples in the validation set (selection)",
                test_examples="examples in the test set (reported only)",
                select="bmojo: tokens kept per chunk", chunk="bmojo: chunk length",
                hybrid_window="mamba_swa's attention window (0: matched to bmojo's memory)")
    p.add_argument("--lrs", nargs="+", type=float, metavar="LR",
                   help="learning rates swept for every model (selected on validation)")
    p.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                   help="seeds of every (model, learning rate): mean +- std")
    for flag, text in (("window", "bmojo, bmojo_f and transformer_window's window"),
                       ("capacity", "bmojo's store capacity"),
                       ("d-state", "every SSM's state size")):
        p.add_argument(f"--{flag}", nargs="+", type=int, metavar="N",
                       help=f"{text}; under --sweep memory, the values swept (every family "
                            f"that sweeps it)")
    p.add_argument("--pattern", help="the hybrids' layers, one per letter: M Mamba, A "
                                     "attention (jamba: full, mamba_swa: windowed); default MA")
    p.add_argument("--dry-run", action="store_true",
                   help="list the planned runs, the overrides and the deviations, and stop")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train N models at a time, each in its own single-thread process "
                        "(jax: XLA's multi-threaded Eigen off)")
    p.set_defaults(func=commands.cmd_mqar)

    from memcore.tasks.lm import DEFAULT_MODELS as LM_DEFAULT
    from memcore.tasks.lm import MODELS as LM_MODELS

    p = sub.add_parser("lm", help="byte-level language model on a text file; loss up to 4L")
    p.add_argument("--text", required=True, metavar="FILE", help="any text file")
    _models_arg(p, LM_MODELS, LM_DEFAULT)
    _run_args(p, "write results, run logs and the plot here (finished runs are kept and "
                 "reused)", seed=None, seed_help="one seed (the same as --seeds N)",
              checkpoints=False)
    _sizes_args(p, steps="training steps of every run (default 3000)",
                seq_len="training length L (the test: 4L)", d_model="model width",
                batch="batch size", lr="one learning rate (the same as --lrs X)",
                eval_every="validation (checkpoint choice) every N steps (default 250)",
                eval_windows="test windows of 4L bytes (default 100)",
                val_windows="validation windows of L bytes (default 100)")
    p.add_argument("--packed", action="store_true",
                   help="train on rows of batch 1 packed with whole documents (the text cut at "
                        "blank lines) with cu_seqlens: no loss across a boundary (torch only)")
    _sweep_args(p, "0 1 2", "1e-3 2e-3 4e-3")
    _jobs_arg(p)
    _threads_arg(p)
    p.set_defaults(func=commands.cmd_lm)

    p = sub.add_parser("moons", help="Memory Mosaics' three moons: 1 head vs 3 heads")
    p.add_argument("--heads", nargs="+", type=int, default=[1, 3], help="default: 1 3")
    p.add_argument("--lr", type=float, help="one learning rate (the same as --lrs X)")
    _run_args(p, "write results, run logs and the plots here (finished runs are kept and "
                 "reused)", seed=None, seed_help="one seed (the same as --seeds N)",
              checkpoints=False)
    _sizes_args(p, steps="training steps (default 500)", batch="batch size (default 64)",
                length="sequence length (default 800)",
                eval_sequences="test sequences per evaluated set (default 512)",
                context_step="spacing of the tested context lengths (default 1: every one)",
                val_sequences="validation sequences, from the training sets (default 64)")
    _sweep_args(p, "100 101 102", "3e-3 1e-2 3e-2")
    p.add_argument("--set-order", choices=["scalar", "simd"],
                   help="tie order of the training sets: numpy's portable argsort (default; "
                        "the official Apple-silicon run) or its x86 SIMD one")
    p.add_argument("--official-cache", action="store_true",
                   help="generate as the official cached generate does (zero values for the "
                        "last context position and the generated ones)")
    _jobs_arg(p)
    _threads_arg(p)
    p.set_defaults(func=commands.cmd_moons)

    from memcore.tasks.regbench import MODELS as RB_MODELS

    p = sub.add_parser("regbench", help="in-context language learning on random automata")
    _models_arg(p, RB_MODELS)
    _run_args(p, "write results, run logs and the plot here (finished runs are kept and "
                 "reused)", seed=None, seed_help="one seed (the same as --seeds N)",
              checkpoints=False)
    _sizes_args(p, steps="training steps (default 0: --epochs over the training automata)",
                epochs="epochs when --steps is 0 (default 200)", batch="batch size (default 32)",
                train_dfas="training automata (default 1000)",
                val_dfas="validation automata (default 250)",
                test_dfas="test automata (default 250)",
                max_string_len="longest string (default 49)",
                d_model="model width (default 128)",
                eval_every="validation every N steps (default 0: every epoch)", lr="one "
                "learning rate (the same as --lrs X)")
    _sweep_args(p, "0 1 2", "2.5e-4 5e-4 1e-3")
    _jobs_arg(p)
    _threads_arg(p)
    p.set_defaults(func=commands.cmd_regbench)
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
