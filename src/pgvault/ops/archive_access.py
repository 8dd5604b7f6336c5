"""Can the PostgreSQL server's OS user run the archive_command it was given?

PostgreSQL runs archive_command (and restore_command) as its own OS user, usually
``postgres``, with its own PATH. A pgvault that works from the administrator's shell can be
out of that user's reach: a venv built on a Python inside root's home (pyenv), a config file
only root may read, a repository folder it may not write. The archiver then only logs the
failure, so ``check-archive`` names the one path that user cannot use.

Permissions are read from mode bits and group membership (``os.getgrouplist``); ACLs are
not read, so this only ever reports a path whose mode bits already refuse that user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shlex
import stat
import struct
import tomllib
from dataclasses import dataclass
from pathlib import Path

# The PATH the server's children see when it is unknown (pg_ctlcluster and systemd set this).
DEFAULT_SERVER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_MAX_SYMLINKS = 40  # as the kernel's own limit on a path's symlinks


@dataclass(frozen=True)
class Account:
    """An OS user as the kernel checks it: uid and every group it belongs to."""

    name: str
    uid: int
    groups: frozenset[int]

    @classmethod
    def of_uid(cls, uid: int) -> Account:
        entry = pwd.getpwuid(uid)
        return cls(entry.pw_name, uid,
                   frozenset(os.getgrouplist(entry.pw_name, entry.pw_gid)))


@dataclass(frozen=True)
class Server:
    """The local server behind a connection: whose it is and what PATH its children get."""

    account: Account
    path: str


def local_server(data_directory: str, system_identifier: str, *,
                 backend_pid: int | None = None) -> Server | None:
    """The server's OS account, when the server behind the connection runs on this machine.

    The data folder's owner is the server's OS user (PostgreSQL refuses to start otherwise);
    its pg_control must hold the same system identifier, so that a folder of the same name
    on this machine never stands in for a remote server's. A process that may not read
    pg_control (neither root nor that user) falls back on ``backend_pid``, given only for a
    connection over a unix socket or loopback: the owner of that ``postgres`` process.
    """
    folder = Path(data_directory)
    owner: int | None = None
    try:
        with open(folder / "global" / "pg_control", "rb") as control:
            head = control.read(8)
        # ControlFileData starts with the uint64 system identifier, in the server's order.
        if len(head) == 8 and str(struct.unpack("=Q", head)[0]) == system_identifier:
            owner = folder.stat().st_uid
    except OSError:
        pass
    if owner is None and backend_pid is not None:
        process = Path(f"/proc/{backend_pid}")
        try:
            if (process / "comm").read_text().strip() == "postgres":
                owner = process.stat().st_uid
        except OSError:
            pass
    if owner is None:
        return None
    try:
        account = Account.of_uid(owner)
    except KeyError:
        return None
    return Server(account, _postmaster_path(folder) or DEFAULT_SERVER_PATH)


def _postmaster_path(folder: Path) -> str | None:
    """PATH from the postmaster's environment (readable by root or the server's user)."""
    try:
        pid = int((folder / "postmaster.pid").read_text().split("\n", 1)[0])
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except (OSError, ValueError):
        return None
    for entry in environ.split(b"\0"):
        if entry.startswith(b"PATH="):
            return entry[5:].decode(errors="replace")
    return None


def _allows(path: Path, account: Account, want: int) -> bool | None:
    """Whether ``account``'s mode bits grant ``want`` (os.R_OK/W_OK/X_OK) on ``path``;
    None when this process cannot even look."""
    try:
        st = os.stat(path)
    except PermissionError:
        return None
    except OSError:
        return False
    mode = st.st_mode
    if account.uid == 0:
        # root passes everything but execute of a file with no x bit at all.
        return not (want & os.X_OK) or stat.S_ISDIR(mode) or bool(mode & 0o111)
    if st.st_uid == account.uid:
        bits = (mode >> 6) & 0o7
    elif st.st_gid in account.groups:
        bits = (mode >> 3) & 0o7
    else:
        bits = mode & 0o7
    return (bits & want) == want


def _describe(path: Path) -> str:
    try:
        st = os.stat(path)
    except OSError as exc:
        return exc.strerror or "unreadable"
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    return f"mode {stat.filemode(st.st_mode)}, owner {owner}"


Refusal = tuple[str, str, bool]
"""A path refused, why (its mode and owner), and whether it is the target itself."""


def blocked(path: str, account: Account, want: int) -> Refusal | None:
    """The first path ``account`` cannot pass on the way to ``path``, or cannot use it
    for ``want``; None when every step allows it.

    Each directory needs x; symlinks are followed as the kernel does (their targets'
    folders need x too), which is where a venv's ``bin/python`` into /root fails.
    """
    resolved = Path("/")
    parts = list(Path(path).parts[1:])
    hops = 0
    while parts:
        part = parts.pop(0)
        if part in ("", "."):
            continue
        if _allows(resolved, account, os.X_OK) is False:
            return str(resolved), _describe(resolved), False
        if part == "..":
            resolved = resolved.parent
            continue
        here = resolved / part
        try:
            mode = os.lstat(here).st_mode
        except FileNotFoundError:
            return str(here), "does not exist", not parts
        except OSError:
            return None  # hidden from this process too: no claim either way
        if stat.S_ISLNK(mode):
            hops += 1
            if hops > _MAX_SYMLINKS:
                return None
            target = Path(os.readlink(here))
            parts = list((target if target.is_absolute() else resolved / target).parts[1:]) \
                + parts
            resolved = Path("/")
            continue
        resolved = here
    if _allows(resolved, account, want) is False:
        return str(resolved), _describe(resolved), True
    return None


def _which(name: str, search: str) -> str | None:
    """The first ``name`` on ``search`` (the shell tries the others only when it is missing)."""
    for folder in search.split(":"):
        candidate = Path(folder or ".") / name
        if candidate.is_file() and os.stat(candidate).st_mode & 0o111:
            return str(candidate)
    return None


def _interpreter(program: str) -> tuple[str, list[str]] | None:
    """The ``#!`` line of a script: its interpreter and that line's arguments."""
    try:
        with open(program, "rb") as script:
            head = script.read(256)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    words = head[2:].split(b"\n", 1)[0].decode(errors="replace").split()
    return (words[0], words[1:]) if words else None


def _command_words(command: str) -> list[str]:
    """archive_command's words from its program on: leading VAR=value, env and exec dropped."""
    try:
        words = shlex.split(command)
    except ValueError:
        return []
    while words and (_ASSIGNMENT.match(words[0]) or words[0] == "exec"
                     or Path(words[0]).name == "env"):
        words.pop(0)
        while words and Path(words[0]).name != "env" and (
                _ASSIGNMENT.match(words[0]) or words[0].startswith("-")):
            words.pop(0)
    return words


def _option(words: list[str], name: str) -> str | None:
    for index, word in enumerate(words):
        if word == name and index + 1 < len(words):
            return words[index + 1]
        if word.startswith(name + "="):
            return word[len(name) + 1:]
    return None


def diagnose(command: str, server: Server, setting: str = "archive_command") -> str | None:
    """One clause naming what the server's OS user cannot do to run ``command`` (the value
    of ``setting``: archive_command or restore_command), or None."""
    user = server.account.name
    words = _command_words(command)
    if not words or "%" in words[0]:
        return None
    program = words[0]
    if "/" not in program:
        found = _which(program, server.path)
        if found is None:
            return (f"{setting} runs {program!r}, which is not on the server's PATH "
                    f"({server.path}); name pgvault's absolute path in {setting}")
        program = found
    elif not os.path.isabs(program):
        return None  # relative to the data folder: too rare to guess at
    refused = blocked(program, server.account, os.X_OK)
    if refused is not None:
        return _cannot(user, "execute", refused, f"{setting}'s program", program, setting=setting)
    shebang = _interpreter(program)
    if shebang is not None:
        interpreter, args = shebang
        refused = blocked(program, server.account, os.R_OK)  # the interpreter reads the script
        if refused is not None:
            return _cannot(user, "read", refused, f"{setting}'s script", program, setting=setting)
        if Path(interpreter).name == "env" and args:
            interpreter = _which(args[-1], server.path) or interpreter
        refused = blocked(interpreter, server.account, os.X_OK)
        if refused is not None:
            return _cannot(user, "execute", refused, f"the interpreter of {program}",
                           interpreter, setting=setting)
    config_file = _option(words, "--config")
    if config_file and os.path.isabs(config_file):
        refused = blocked(config_file, server.account, os.R_OK)
        if refused is not None:
            return _cannot(user, "read", refused, "the config file", config_file,
                           "make it readable by {user} (e.g. owner root, group {user}, "
                           "mode 0640)", setting=setting)
    return _repository_problem(_repository(command, words, config_file), server, setting)


def _repository(command: str, words: list[str], config_file: str | None) -> str | None:
    """The repository the command names: --repo, else PGVAULT_REPO=, else the config's."""
    repo = _option(words, "--repo")
    if repo:
        return repo
    with contextlib.suppress(ValueError):
        for word in shlex.split(command):
            if word.startswith("PGVAULT_REPO="):
                return word[len("PGVAULT_REPO="):]
    if config_file:
        with contextlib.suppress(OSError, tomllib.TOMLDecodeError):
            value = tomllib.loads(Path(config_file).read_text()).get("repo")
            return value if isinstance(value, str) else None
    return None


def _repository_problem(repo: str | None, server: Server, setting: str) -> str | None:
    """A local repository folder (or its nearest existing parent) the server's user cannot
    write."""
    if not repo:
        return None
    path = repo[len("file://"):] if repo.startswith("file://") else repo
    if "://" in path or not os.path.isabs(path):
        return None
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    refused = blocked(str(folder), server.account, os.W_OK | os.X_OK)
    if refused is not None:
        what = "the repository" if str(folder) == path else f"the folder of repository {repo}"
        return _cannot(server.account.name, "write", refused, what, str(folder),
                       "give {user} a repository folder it can write", setting=setting)
    return None


_INSTALL = ("install pgvault (and its Python) where {user} can run it, e.g. a venv on "
            "/usr/bin/python3 in /opt/pgvault (README: Where to install pgvault for WAL "
            "archiving)")


def _cannot(user: str, verb: str, refused: Refusal, what: str, target: str,
            advice: str = _INSTALL, *, setting: str) -> str:
    path, why, final = refused
    if final:
        where = f"{target} ({why})" if path == target else f"{target} ({path}: {why})"
        problem = f"cannot {verb} {where}, {what}"
    else:
        problem = f"cannot pass {path} ({why}) to reach {target}, {what}"
    return (f"the server runs {setting} as OS user {user}, who {problem}; "
            + advice.format(user=user))
