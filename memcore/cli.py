"""The ``memcore`` command line.

    memcore verify [--targets T ...] [--cases C ...] [-v]     the contract's checks, as a table
    memcore info                                               version, backends, libraries
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
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
