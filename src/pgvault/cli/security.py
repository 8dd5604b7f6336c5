"""Commands and options for encryption keys: keygen, --identity-file."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from pgvault.cli.app import cli

IDENTITY_HELP = """\b
Encrypted backups ([encryption] recipients, PGVAULT_AGE_RECIPIENTS) need the
matching secret key to be read: --identity-file or PGVAULT_AGE_IDENTITY_FILE (an
age key file from `pgvault keygen`/`age-keygen`, or an SSH private key). In
passphrase mode, PGVAULT_AGE_PASSPHRASE(_FILE) opens the repository's key.
"""


def identity_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--identity-file`` for commands that read backup data (restore, verify)."""
    return click.option(
        "--identity-file", "identity_file", metavar="FILE",
        type=click.Path(dir_okay=False),
        help="age identity (secret key) for encrypted backups "
             "[env PGVAULT_AGE_IDENTITY_FILE, config encryption.identity_file].")(func)


@cli.command()
@click.option("-o", "--output", metavar="FILE", type=click.Path(dir_okay=False),
              help="Write the identity to FILE (mode 0600; never overwrites). "
                   "Without it the identity goes to stdout.")
def keygen(output: str | None) -> None:
    """Create an age identity (secret key) and print its recipient (public key).

    Backups are encrypted to recipients only, so the host that takes backups never
    holds a key that can read them. Keep the identity file off that host (a password
    manager, a restore-only host) and give its recipient to the backup config.
    The file is a standard age key file: `age -d -i FILE` reads backups too.

    \b
    Examples:
      pgvault keygen -o ~/.config/pgvault/restore-key.txt      # prints age1...
      export PGVAULT_AGE_RECIPIENTS=age1...                    # on the backup host
      pgvault restore latest --to app_copy --identity-file ~/.config/pgvault/restore-key.txt
      age -d -i restore-key.txt db.dump.zst.age | zstd -d | pg_restore -d app_copy

    \b
    Rotation: add the new recipient beside the old one, back up, move the old
    identity to cold storage; old backups still need the old identity (the error
    names the recipients a backup was encrypted for).
    """
    from pgvault.pipeline.age import new_identity, write_identity_file

    text, recipient = new_identity()
    if output:
        write_identity_file(output, text)
        click.echo(recipient)
        click.echo(f"wrote the identity to {output} (mode 0600); keep it off the backup host",
                   err=True)
    else:
        click.echo(text, nl=False)
        click.echo(f"Public key: {recipient}", err=True)
