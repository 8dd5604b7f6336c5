"""`pgvault console`: the read-only web console, without the daemon's scheduler."""

from __future__ import annotations

from typing import Any

import click

from pgvault.cli.app import EXIT_CODES, cli, common, settings_of, startup_done

CONSOLE_HELP = """\b
Security:
  On loopback (the default, 127.0.0.1:9848) anyone on this host may read it,
  as they may read /status. Listening anywhere else needs a token, or the
  console refuses to start: put one (16+ characters, e.g. `openssl rand -hex
  32`) in a file only pgvault reads and name it as [console] token_file or
  PGVAULT_CONSOLE_TOKEN_FILE. Then every page asks for it (a login form sets
  an HttpOnly, SameSite=Strict cookie; scripts send `Authorization: Bearer`).
  Pages run no script (Content-Security-Policy: default-src 'none'), and no
  password or secret URL is ever rendered.

\b
Actions ([console] actions = true; off by default):
  back up now, drill now, pin/unpin, and restore into a NEW database only:
  the server refuses a target that exists, is the source, or is postgres,
  template0 or template1, and one whose name is not typed twice. Every form
  carries a CSRF token; every action is an event (action.started/succeeded/
  failed) naming who asked, and its page shows the equivalent command.
"""


def _sources(settings: Any) -> Any:
    """(name, vault) of every database to show, asked again on every request: configured
    databases ([[databases]], or the one the connection names), else every database that
    has backups in the repository, so a new one appears without a restart."""
    from pgvault import config
    from pgvault.vault import Vault

    storages: dict[str, Any] = {}
    chosen: list[tuple[str | None, Any]] = []
    for target in config.targets(settings):
        shared = storages.get(target.settings.repo)
        vault = Vault.open(target.settings, storage=shared)
        if shared is None:
            vault.catalog.require()  # a mistyped repository must not read as an empty one
            storages[target.settings.repo] = vault.storage
        name = target.name or config.connection(target.settings).dbname
        chosen.append((name or None, vault))

    def sources() -> list[tuple[str, Any]]:
        found: list[tuple[str, Any]] = []
        for name, vault in chosen:
            if name:
                found.append((name, vault))
            else:
                found += [(n, vault) for n in vault.catalog.databases()]
        return found

    return sources


def _actions(settings: Any) -> Any:
    """The console's actions ([console] actions = true): each database reached as
    `pgvault backup -d NAME` reaches it, drills run as `pgvault verify` runs them."""
    from pgvault import config
    from pgvault.cli.monitor import _drill
    from pgvault.web.actions import Actions

    named = {t.name: t for t in config.targets(settings) if t.name}

    def connect(name: str) -> Any:
        target = named.get(name)
        if target is not None:
            return config.target_connection(target)
        return config.target_connection(config.targets(settings)[0], name)

    return Actions(connect=connect, drill=_drill)


@cli.command(epilog=CONSOLE_HELP + "\n" + EXIT_CODES)
@common
@click.option("--listen", metavar="HOST:PORT", default=None,
              help="Serve the console here [config console.listen, default 127.0.0.1:9848].")
@click.pass_context
def console(ctx: click.Context, /, listen: str | None, **_: Any) -> None:
    """Serve the web console: every database's state, backups and drills.

    The overview shows one row per database, worst first: OK / WARNING /
    CRITICAL with the reasons `pgvault check` gives, the newest good backup and
    its age against the RPO, the last restore drill and its restore time
    against the RTO, the last error. A database's page lists every backup
    (kind, size, duration, compression, pin, what the next prune does with it
    and why, damage), every drill's checks (PASS / FAIL / WARN / SKIP) and the
    exact commands for each action: the console itself changes nothing unless
    [console] actions = true.
    Everything is read from the repository on each request. `pgvault daemon`
    serves the same pages on its own listen address ([console] enabled).

    \b
    Examples:
      pgvault console --config /etc/pgvault.toml          # http://127.0.0.1:9848/
      pgvault console --repo s3://backups/app --listen 127.0.0.1:8080
      PGVAULT_CONSOLE_TOKEN_FILE=/run/secrets/console-token \\
        pgvault console --listen 0.0.0.0:9848              # in a container
      curl -s -H "Authorization: Bearer $(cat token)" http://host:9848/

    \b
    Config:
      [console]
      listen = "127.0.0.1:9848"      # pgvault console (the daemon: [daemon] listen)
      token_file = "/etc/pgvault/console-token"
      enabled = true                 # the daemon serves it too
      actions = false                # true: backup, drill, pin, restore (new db)
    """
    import time

    from pgvault.daemon import parse_listen
    from pgvault.errors import ConfigError, Terminated
    from pgvault.web.app import Console, console_token, is_loopback, serve

    settings = settings_of(ctx)
    host, port = parse_listen(listen or settings.console.listen)
    token = console_token(settings)
    if token is None and not is_loopback(host):
        raise ConfigError(f"the console would listen on {host}, beyond loopback, without a "
                          "token: set [console] token_file or PGVAULT_CONSOLE_TOKEN_FILE "
                          "(or listen on 127.0.0.1)")
    sources = _sources(settings)
    actions = _actions(settings) if settings.console.actions else None
    startup_done()
    server = serve(Console(sources, host=host, token=token, actions=actions), (host, port))
    bound_host, bound_port = str(server.server_address[0]), int(server.server_address[1])
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    click.echo(f"pgvault console: http://{shown}:{bound_port}/ ("
               + ("actions enabled" if actions else "read-only")
               + ("; token required" if token else "") + "); Ctrl-C or SIGTERM stops it")
    try:
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, Terminated):
        pass  # stopping is what these signals ask of a server: exit 0
    finally:
        server.shutdown()
        server.server_close()
