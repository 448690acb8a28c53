"""Run management: ``python -m launcher status|logs|cancel <run dir>`` for every backend."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from launcher.backends import get_backend
from launcher.errors import LaunchError
from launcher.record import read_record, update_record


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launcher", description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    status = sub.add_parser("status", help="state of the run's job (and exit code when done)")
    status.add_argument("run_dir", type=Path)
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    logs = sub.add_parser("logs", help="print the job's output")
    logs.add_argument("run_dir", type=Path)
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing while it runs")
    logs.add_argument("-n", "--tail", type=int, default=None, help="only the last N lines")
    cancel = sub.add_parser("cancel", help="stop the job")
    cancel.add_argument("run_dir", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        record = read_record(args.run_dir)
        backend = get_backend(record.backend)
        if args.action == "status":
            status = backend.status(record)
            if args.json:
                print(json.dumps(status.to_json(), sort_keys=True))
            else:
                details = " ".join(f"{k}={v}" for k, v in status.details.items())
                print(f"{record.run_name}: {status.state} {details}".rstrip())
        elif args.action == "logs":
            backend.logs(record, follow=args.follow, tail=args.tail)
        else:
            update_record(args.run_dir, **backend.cancel(record))
            print(f"{record.run_name}: cancelled")
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
