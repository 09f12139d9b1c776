"""Command line: serve | check-config | demo | probe | cache."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sqlite3
import sys

import trio

from .client import EarlyPipeliningClient
from .config import DEFAULT_CACHE_PATH, Address, Config, ConfigError, load_config
from .demomta import DemoMessage, DemoMTA
from .listen import dual_stack
from .metrics import VERSION, Metrics
from .probe import ProbeError, parse_target, probe
from .server import run_until_signal, serve
from .smtp import EARLY_PIPELINING_KEYWORDS
from .tls import TLSConfigError

log = logging.getLogger("pipeconnect")


def _setup_logging(level: str) -> None:
    # Under systemd stderr is the journal (JOURNAL_STREAM set), which stamps every line.
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper()),
        format=stamp + "%(levelname)s %(name)s %(message)s",
    )


def _error_lines(exc: ConfigError, path: str) -> list[str]:
    """One ``FILE: KEY: MESSAGE`` line per error (file-level errors are keyed by the file)."""
    return [str(e) if e.key == path else f"{path}: {e}" for e in exc.errors]


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for line in _error_lines(exc, args.config):
            print(f"pipeconnect-proxy: {line}", file=sys.stderr)
        return 2
    if args.log_format:
        config = dataclasses.replace(
            config, log=dataclasses.replace(config.log, format=args.log_format)
        )
    _setup_logging(args.log_level)
    log.info("pipeconnect-proxy %s, configuration %s", VERSION, args.config)
    try:
        if config.server.workers > 1:
            from .workers import run as run_workers  # forks: import only when used

            return run_workers(config, args.config)
        trio.run(run_until_signal, config, Metrics(), args.config)
    except TLSConfigError as exc:  # e.g. a key file the service user cannot read
        print(f"pipeconnect-proxy: {args.config}: tls: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    """Every error in the file (exit 1), or a summary of what it sets up (exit 0)."""
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        if args.json:
            errors = [{"key": e.key, "message": e.message} for e in exc.errors]
            print(json.dumps({"ok": False, "file": args.config, "errors": errors}, indent=2))
        else:
            print("\n".join(_error_lines(exc, args.config)), file=sys.stderr)
        return 1
    listen = config.listen
    listed = listen.plain + listen.tls_on_connect
    if args.json:
        summary = {
            "ok": True,
            "file": args.config,
            "plain": [str(a) for a in listen.plain],
            "tls_on_connect": [str(a) for a in listen.tls_on_connect],
            "dual_stack": [str(a) for a in listed if dual_stack(a, listed)],
            "upstream": str(config.upstream.address),
            "client_identity": config.upstream.client_identity,
            "metrics": None if config.metrics.listen is None else str(config.metrics.listen),
            "workers": config.server.workers,
            "outbound": (
                [str(a) for a in config.outbound.listen] if config.outbound.enabled else None
            ),
        }
        print(json.dumps(summary, indent=2))
        return 0
    listeners = (
        ", ".join(f"{a} (IPv6 and IPv4)" if dual_stack(a, listed) else str(a) for a in listen.plain)
        or "none"
    )
    outbound = (
        f"; outbound: {', '.join(str(a) for a in config.outbound.listen)}"
        if config.outbound.enabled
        else ""
    )
    print(f"{args.config}: OK (plain: {listeners}; upstream {config.upstream.address}{outbound})")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """Outbound mode's EHLO cache: list the entries, or flush all or one destination's."""
    from .ehlocache import EhloCache, describe

    try:
        path = load_config(args.config).outbound.cache if args.config else args.file
    except ConfigError as exc:
        for line in _error_lines(exc, args.config):
            print(f"pipeconnect-proxy: {line}", file=sys.stderr)
        return 2
    try:
        cache = EhloCache(path)
        if args.action == "flush":
            print(f"{cache.flush(args.dest)} entries flushed from {path}")
            return 0
        entries = [e for e in cache.entries() if args.dest is None or e.dest == args.dest]
    except (OSError, sqlite3.Error) as exc:
        print(f"pipeconnect-proxy cache: {path}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([describe(e) for e in entries], indent=2))
    else:
        for e in entries:
            d = describe(e)
            print(" ".join(f"{k}={v}" for k, v in d.items() if k not in ("banner", "ehlo")))
        print(f"{len(entries)} entries in {path}")
    return 0


async def _demo(rounds: int) -> None:
    def show(msg: DemoMessage) -> None:
        print(
            f"  demo MTA <= {msg.mail_from} -> {', '.join(msg.rcpts)} via {msg.via}, "
            f"{len(msg.data)} bytes, client {msg.client_addr} (from the PROXY header), "
            f"HELO {msg.helo}"
        )

    mta = DemoMTA(proxy_protocol=True, on_message=show)
    async with trio.open_nursery() as nursery:
        mta_port: int = await nursery.start(mta.serve)
        base = Config.default()
        config = dataclasses.replace(
            base,
            # The demo client never sends data in a SYN: no TFO, and no sysctl warning.
            listen=dataclasses.replace(
                base.listen, plain=(Address("127.0.0.1", 0),), tcp_fastopen=False
            ),
            upstream=dataclasses.replace(base.upstream, address=Address("127.0.0.1", mta_port)),
            # No metrics port: a fixed one could be taken (and the demo prints what it saw).
            metrics=dataclasses.replace(base.metrics, listen=None),
        )
        metrics = Metrics()
        bound = await nursery.start(serve, config, metrics)
        proxy = bound[0]
        print(f"demo MTA on 127.0.0.1:{mta_port}; pipeconnect-proxy on {proxy[0]}:{proxy[1]}")
        client = EarlyPipeliningClient()
        body = b"Subject: demo\r\n\r\nHello through pipeconnect-proxy.\r\n.leading dot\r\n"
        turns: list[int] = []
        for i in range(1, rounds + 1):
            d = await client.send(proxy, "alice@demo.test", ["bob@dest.test"], body)
            turns.append(d.turns)
            how = (
                "early pipelining: EHLO, MAIL, RCPT, DATA sent before the banner"
                if d.early
                else "classic: waited for the banner, then EHLO, then the envelope"
            )
            kw = [k for k in EARLY_PIPELINING_KEYWORDS if k in d.keywords]
            print(
                f"session {i}: {how}\n  {d.turns} round trips to the final "
                f"{d.final.code}; EHLO advertised {', '.join(kw) or 'no keyword'}"
            )
        if len(turns) >= 2:
            print(
                f"round trips saved by early pipelining: {turns[0] - turns[-1]} "
                f"({turns[0]} -> {turns[-1]}) on every later delivery to this server"
            )
        nursery.cancel_scope.cancel()


def cmd_demo(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    trio.run(_demo, args.rounds)
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    try:
        target = parse_target(args.target)
        result = trio.run(lambda: probe(target, ehlo_name=args.ehlo, timeout=args.timeout))
    except ProbeError as exc:
        print(f"pipeconnect-proxy probe {args.target}: {exc}", file=sys.stderr)
        return 1
    print(result.dumps() if args.json else result.report())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeconnect-proxy", description="Early-pipelining SMTP proxy"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {VERSION}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the proxy in the foreground until SIGTERM/SIGINT")
    p.add_argument("--config", required=True)
    p.add_argument("--log-format", choices=["text", "json"])
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("check-config", help="validate a configuration file, reporting every error")
    p.add_argument("config")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_check_config)
    p = sub.add_parser("demo", help="run the proxy in front of a built-in MTA and show it work")
    p.add_argument("--rounds", type=int, default=2)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser(
        "probe", help="show what an early-pipelining client learns from a server, and the gain"
    )
    p.add_argument("target", metavar="HOST[:PORT]", help="the server (port 25 if omitted)")
    p.add_argument("--ehlo", default="probe.invalid", metavar="NAME", help="name sent in EHLO")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per step (default 30)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_probe)
    p = sub.add_parser("cache", help="outbound mode's EHLO cache: list or flush it")
    p.add_argument("action", choices=["list", "flush"])
    p.add_argument("dest", nargs="?", metavar="DEST", help="one destination IP only")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--config", help="take outbound.cache from this configuration file")
    where.add_argument("--file", default=DEFAULT_CACHE_PATH, help="the cache file itself")
    p.add_argument("--json", action="store_true", help="print the entries as JSON")
    p.set_defaults(func=cmd_cache)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
