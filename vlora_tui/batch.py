"""Headless ``vlora-tui --batch`` (interim: info and demo; the job layer extends it)."""

from __future__ import annotations

import argparse
import json
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlora-tui --batch", description="Run one vlora-tui job headless.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="summarize an adapter (reads the header only)")
    info.add_argument("path")
    info.add_argument("--json", action="store_true")
    demo = sub.add_parser("demo", help="write the demo collection")
    demo.add_argument("-o", "--output", required=True)
    demo.add_argument("--force", action="store_true")
    demo.add_argument("--json", action="store_true")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from engine.errors import VloraError

    try:
        if args.command == "info":
            from engine.io.header import read_adapter_summary

            s = read_adapter_summary(args.path)
            if args.json:
                print(json.dumps(s.to_dict(), indent=2))
            else:
                print(f"{s.path}: {len(s.modules)} modules, r={s.rank}, alpha={s.lora_alpha}, {s.num_params} params, {s.nbytes} bytes")
            return 0
        if args.command == "demo":
            from engine.demo import make_demo_collection

            paths = make_demo_collection(args.output, force=args.force)
            print(json.dumps([str(p) for p in paths]) if args.json else f"wrote {len(paths)} adapters to {args.output}")
            return 0
    except (VloraError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1
