"""Command line: ``python -m healthmon {demo,report,run} ...``."""
from __future__ import annotations

import argparse
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

    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import main as demo_main
        return demo_main(steps=args.steps, out_dir=args.out, progress=not args.no_progress)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
