"""Command line: ``python -m healthmon {demo,report,run} ...``."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``python -m healthmon`` and the ``healthmon`` script."""
    parser = argparse.ArgumentParser(prog="python -m healthmon",
                                     description="healthmon: tensor health monitor for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a small segmentation model, healthy then with "
                                       "two injected bugs, and show the reports")
    demo.add_argument("--steps", type=int, default=300, help="training steps per run")
    demo.add_argument("-o", "--out", default="healthmon-demo", help="output directory")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")

    report = sub.add_parser("report", help="render PNG plots and an HTML page from JSONL logs")
    report.add_argument("logs", nargs="+", metavar="RUN.jsonl",
                        help="healthmon JSONL logs (rotated files are included); a base name "
                             "run.jsonl stands for its rank files run.rank<R>.jsonl, which "
                             "are merged; a quoted glob works too")
    report.add_argument("-o", "--out", default=None,
                        help="output directory (default: <first log>-report)")
    report.add_argument("--step", type=int, default=None,
                        help="step of the bar charts (default: the anomaly's, else the last)")

    run = sub.add_parser(
        "run", help="run an unmodified training script with every nn.Module monitored",
        description="Run SCRIPT.py as __main__ with every outermost nn.Module watched "
                    "(global module hooks). The HEALTHMON* environment applies "
                    "(HEALTHMON=off: no hooks); the options below override it. Exit status: "
                    "the script's, or 1 after a healthmon report.")
    run.add_argument("--sync", action="store_true", default=None,
                     help="check inside each hook and raise at the line (HEALTHMON=sync)")
    run.add_argument("--every", type=int, default=None, metavar="N",
                     help="monitor one step in N (HEALTHMON_EVERY)")
    run.add_argument("--on-anomaly", choices=("raise", "warn", "log", "skip"), default=None,
                     help="policy (HEALTHMON_ON_ANOMALY; default raise)")
    run.add_argument("--log", default=None, metavar="PATH",
                     help="JSONL log of the records (HEALTHMON_LOG)")
    run.add_argument("--allow-inf", action="append", default=None, metavar="PATTERN",
                     help="fnmatch pattern of sites (or site.role) whose forward outputs / "
                          "inputs may hold ±Inf, e.g. '<input>.input.attn_mask' or "
                          "'encoder.*'; repeatable; added to HEALTHMON_ALLOW_INF. NaN is "
                          "never allowed; 0/-inf additive masks need no pattern")
    run.add_argument("-q", "--quiet", action="store_true", help="no start-up line")
    run.add_argument("script", metavar="SCRIPT.py", help="the training script")
    run.add_argument("script_args", nargs=argparse.REMAINDER, metavar="...",
                     help="arguments passed to the script")

    args = parser.parse_args(argv)
    if args.command == "run":
        from .runner import RunSetupError, run_script
        try:
            return run_script(args.script, args.script_args, quiet=args.quiet, sync=args.sync,
                              every=args.every, on_anomaly=args.on_anomaly, log=args.log,
                              allow_inf=args.allow_inf)
        except RunSetupError as err:  # the script's own exceptions propagate unchanged
            print(f"healthmon run: {err}", file=sys.stderr)
            return 2
    if args.command == "demo":
        from .demo import main as demo_main
        return demo_main(steps=args.steps, out_dir=args.out, progress=not args.no_progress)
    if args.command == "report":
        from .report import render_report
        out = args.out or os.path.splitext(args.logs[0])[0] + "-report"
        try:
            print(render_report(args.logs, out, step=args.step))
        except (OSError, ValueError) as err:
            print(f"healthmon report: {err}", file=sys.stderr)
            return 1
        return 0
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
