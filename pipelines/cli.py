"""The ``sempa`` console script: the library's commands (``sempa_train.cli``) plus ``sempa prefect``.

``sempa prefect up|run|status|down`` manages a local Prefect server, work pool, deployments and
worker (``pipelines.local``); it lives here so that the library never imports Prefect.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sempa_train import cli


def add_prefect_command(sub: Any) -> None:
    """The ``sempa prefect`` subcommand's parser."""
    p = sub.add_parser("prefect", help="local Prefect: up (server, pool, deployments, worker), run, status, down",
                       description="Set up Prefect locally in one step: `up` starts a server on 127.0.0.1 "
                       "(embedded SQLite), creates the process work pool, deploys flows.yaml, starts a worker and "
                       "points the active Prefect profile at the server. `run NAME` runs a deployment and waits "
                       "(prefect deployment run sempa/NAME --watch). `down` stops what `up` started.")
    p.add_argument("action", choices=("up", "run", "status", "down"))
    p.add_argument("deployment", nargs="?", default="full", help="for run: full, refresh or evaluate")
    p.add_argument("--param", action="append", default=[], metavar="KEY=JSON",
                   help="for run: a flow parameter, value in JSON (repeatable)")
    p.add_argument("--port", type=int, default=4200, help="server port (default 4200)")
    p.add_argument("--host", default="127.0.0.1", help="interface the server listens on (default 127.0.0.1); "
                   "another one needs --auth-string-file")
    p.add_argument("--auth-string-file", type=Path, help="file holding user:password: Prefect's basic auth for "
                   "the server and this machine's clients (docs/SECURITY.md)")
    p.add_argument("--state-dir", type=Path, default=Path("outputs/prefect"), help="pid files and logs")
    p.add_argument("--no-schedules", action="store_true", help="for up: deploy without the refresh deployment's "
                   "daily schedule (by default it runs at 03:00 UTC)")


def prefect_command(args: argparse.Namespace) -> None:
    """Bring the local Prefect stack up or down, run a deployment and wait, or print its status."""
    from pipelines.local import LocalPrefect, PrefectUnavailableError

    try:
        local = LocalPrefect(port=args.port, state_dir=args.state_dir, host=args.host,
                             auth_string_file=args.auth_string_file)
        if args.action == "up":
            local.up(schedules=not args.no_schedules)
            print(f"Prefect server: {local.api_url.removesuffix('/api')} (UI); worker on pool {local.pool}")
            if args.no_schedules:
                print("schedules:         none (deployed with --no-schedules)")
            else:
                print("schedules:         sempa/refresh runs daily at 03:00 UTC (sempa prefect up --no-schedules, "
                      "or pause it in the UI)")
            print("run the pipeline:  prefect deployment run sempa/full --watch")
            print("stop everything:   sempa prefect down")
        elif args.action == "run":
            params = {}
            for item in args.param:
                key, _, value = item.partition("=")
                try:
                    params[key] = json.loads(value)
                except json.JSONDecodeError:
                    params[key] = value
            code = local.run_deployment(args.deployment, params)
            if code != 0:
                raise RuntimeError(f"deployment sempa/{args.deployment} did not complete (exit code {code})")
        elif args.action == "status":
            print(json.dumps(local.status(), indent=2))
        else:
            local.down()
            print("stopped the worker and the server started by `sempa prefect up`")
    except PrefectUnavailableError as e:
        raise RuntimeError(str(e)) from e


def main(argv: Sequence[str] | None = None) -> int:
    """The ``sempa`` console script."""
    return cli.main(argv, extend=add_prefect_command, commands={"prefect": prefect_command})


if __name__ == "__main__":
    sys.exit(main())
