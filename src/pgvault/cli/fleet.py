"""`pgvault run --shard I/N`: one worker of a fleet of [[databases]]."""

from __future__ import annotations

import json
from typing import Any

import click

from pgvault.cli.app import EXIT_CODES, cli, common, invocation, settings_of, startup_done
from pgvault.errors import BackupFailed, UsageError

FLEET_HELP = """\b
Fleet settings ([fleet] in the config file, or PGVAULT_FLEET__<KEY>):
  window_hours = 24          one backup per database per window (aligned on UTC)
  jitter_minutes = 0         starts spread over the first minutes of the window
  max_per_repository = 4     backups at once in the repository, across all workers
  max_per_server = 1         backups at once per database server (host:port)
  lease_seconds = 120        a worker that stops renewing loses its databases after this
  backoff_seconds = 60       wait after a failure, doubled each time ...
  backoff_max_seconds = 3600 ... up to this
"""


@cli.command("run", epilog=FLEET_HELP + "\n" + EXIT_CODES)
@common
@click.option("--shard", metavar="I/N", default=None,
              help="This worker's shard: worker I (0-based) of N. Default: a Kubernetes "
                   "Indexed Job's JOB_COMPLETION_INDEX / JOB_COMPLETIONS, else 0/1.")
@click.option("--json", "as_json", is_flag=True, help="Print the window's report as JSON.")
@click.pass_context
def run(ctx: click.Context, /, shard: str | None, as_json: bool, **_: Any) -> None:
    """Back up this shard of the fleet's [[databases]] once in the current window.

    Each database belongs to one shard (rendezvous hashing of its name: changing N
    moves about 1/N of them). It is backed up under a lease in the repository
    (fleet/leases/<db>.json, a conditional write renewed while the backup runs), so a
    database gets one backup per window even when workers overlap, restart, or disagree
    on N; a lease not renewed for lease_seconds is taken over. The run returns once
    every database of the shard has this window's backup (exit 0), or the window ends
    without one for some (exit 8, naming them). Missed windows (an outage) give one
    catch-up backup in the current window, not one per window missed.

    \b
    Examples:
      pgvault run --shard 0/1 --config fleet.toml     # the whole fleet, one worker
      pgvault run --shard 2/4 --config fleet.toml     # worker 2 of 4 (0-based)
      JOB_COMPLETION_INDEX=1 JOB_COMPLETIONS=4 pgvault run --config fleet.toml
    """
    from pgvault import fleet
    from pgvault.ops.fleet import run_shard

    environ = invocation(ctx).environ
    try:
        chosen = (fleet.parse_shard(shard) if shard is not None
                  else fleet.shard_from_environ(environ) or fleet.Shard(0, 1))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    settings = settings_of(ctx)
    startup_done()
    drill_for = _drill_for if settings.verify_after_backup else None
    report = run_shard(settings, chosen, drill_for=drill_for)
    if as_json:
        click.echo(json.dumps({
            "shard": str(report.shard), "window": report.window.index,
            "window_start": report.window.start.isoformat(), "databases": report.databases,
            "backed_up": report.backed_up, "found": report.found,
            "abandoned": report.abandoned, "failures": report.failures,
            "missed": report.missed}, indent=2, sort_keys=True))
    else:
        click.echo(f"shard {report.shard}, window {report.window.index}: "
                   f"{len(report.backed_up)} backed up, {len(report.found)} already had "
                   f"this window's backup, {len(report.missed)} missed "
                   f"(of {report.databases})", err=True)
    if report.missed:
        first = report.missed[0]
        reason = report.failures.get(first, "not reached")
        raise BackupFailed(f"{len(report.missed)} of {report.databases} databases of shard "
                           f"{report.shard} have no backup in window {report.window.index}: "
                           f"{', '.join(report.missed[:10])}; {first}: {reason}")


def _drill_for(vault: Any) -> Any:
    """verify_after_backup: a restore drill of each new backup."""
    from pgvault.cli.verify import scratch_servers, summary_line, verify_options
    from pgvault.ops.verify import verify

    def drill(manifest: Any) -> Any:
        with scratch_servers(vault.settings) as servers:
            report = verify(vault.storage, manifest, verify_options(vault), servers)
        click.echo(summary_line(report), err=True)
        return report

    return drill
