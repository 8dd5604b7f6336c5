"""What of a dump the target server can take as it is: owners, grants, extensions.

A dump of a managed server names roles and extensions another server may lack: objects
owned by the provider's administrator (``supabase_admin``), grants to its roles
(``rds_superuser``), extensions whose files only the provider installs (``pg_graphql``) or
that only a superuser may create (``pg_stat_statements``). And a restore as a managed
server's master role, which is no superuser, cannot give an object to a role it is not a
member of (``must be member of role "postgres"``), half-way through pg_restore.

``plan`` decides before pg_restore starts, from the archive's table of contents and the
target's roles and extensions (``TargetFacts.read``): what pg_restore leaves out (an
extension the target cannot create, and what needs it), which owners and grants pgvault
sets itself afterwards (a ``--role-map``, the provider's roles), and what it cannot decide
for the user: an object owned by, or granted to, an ordinary role the target lacks or the
restoring role may not use. That is one error naming the object and the way out
(``--no-owner``, ``--role-map OLD=NEW``), before anything is created. Row-level security
policies name roles too (``CREATE POLICY ... TO authenticated``): ``_policies`` maps them,
leaves out a provider role's permissive policy, and refuses the rest (see its docstring).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from pgvault.errors import RestoreFailed, UsageError
from pgvault.pg.archive import ABOUT, Selection, Toc, TocEntry, show_name
from pgvault.pg.psql import PsqlSession, identifier

# Roles a provider creates for itself or its API (RDS, Aurora, Supabase, Neon, Cloud SQL,
# Azure): they own or are granted objects in a dump, and mean nothing on another server.
PROVIDER_ROLES = frozenset({
    "rds_superuser", "rdsadmin", "rds_replication", "rds_iam", "rds_password", "rdstopmgr",
    "rds_ad", "supabase_admin", "supabase_auth_admin", "supabase_storage_admin",
    "supabase_functions_admin", "supabase_realtime_admin", "supabase_replication_admin",
    "supabase_read_only_user", "supabase_etl_admin", "dashboard_user", "pgbouncer",
    "pgsodium_keyholder", "pgsodium_keyiduser", "pgsodium_keymaker", "authenticator", "anon",
    "authenticated", "service_role", "neon_superuser", "cloudsqlsuperuser", "cloudsqladmin",
    "cloudsqlagent", "azure_pg_admin", "azure_superuser", "azuresu",
})
# And the families a provider adds to with new features (supabase_etl_admin came late):
# a role of yours named so is treated as a provider's, which only ever leaves something
# out with a warning (an owner given to the restoring role, a grant or policy not made).
PROVIDER_PREFIXES = ("rds_", "supabase_", "neon_", "pgsodium_", "cloudsql", "azure_")


def provider_role(role: str) -> bool:
    """Whether ``role`` is one a provider creates for itself (``PROVIDER_ROLES``)."""
    return role in PROVIDER_ROLES or role.startswith(PROVIDER_PREFIXES)

# The kinds whose owner pg_restore sets with ALTER <kind> ... OWNER TO (pg_backup_archiver.c,
# _printTocEntry), named as their DROP statement names them.
OWNED_KINDS = frozenset({
    "AGGREGATE", "COLLATION", "CONVERSION", "DOMAIN", "FUNCTION", "OPERATOR",
    "OPERATOR CLASS", "OPERATOR FAMILY", "PROCEDURE", "PROCEDURAL LANGUAGE", "SCHEMA",
    "EVENT TRIGGER", "TABLE", "TYPE", "VIEW", "MATERIALIZED VIEW", "SEQUENCE",
    "FOREIGN TABLE", "TEXT SEARCH DICTIONARY", "TEXT SEARCH CONFIGURATION",
    "FOREIGN DATA WRAPPER", "SERVER", "STATISTICS", "PUBLICATION", "SUBSCRIPTION", "BLOB",
})

_ROLE = r'(?:"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)'
# pg_dump writes one grantee per GRANT/REVOKE, last before the semicolon (buildACLCommands).
_GRANTEE = re.compile(rf"\s(?:TO|FROM)\s+({_ROLE})(?:\s+WITH (?:GRANT|ADMIN) OPTION)?;\s*$")
_FOR_ROLE = re.compile(rf"\bFOR ROLE\s+({_ROLE})\s")
# pg_dump's dumpPolicy: CREATE POLICY name ON schema.table [AS RESTRICTIVE] [FOR cmd]
# [TO role, ...] [USING (...)] [WITH CHECK (...)]; its roles quote_ident'ed, ", "-joined,
# no TO at all for PUBLIC. The keywords are taken too, for an archive written otherwise.
_ROLE_SPEC = rf"(?:{_ROLE})"
_POLICY = re.compile(
    rf"^\s*CREATE POLICY\s+(?P<name>{_ROLE})\s+ON\s+(?P<table>{_ROLE}(?:\.{_ROLE})?)"
    r"(?:\s+AS\s+(?P<kind>PERMISSIVE|RESTRICTIVE))?"
    r"(?:\s+FOR\s+(?:ALL|SELECT|INSERT|UPDATE|DELETE))?"
    rf"(?:\s+TO\s+(?P<roles>{_ROLE_SPEC}(?:\s*,\s*{_ROLE_SPEC})*))?"
    r"(?=\s+USING\b|\s+WITH\s+CHECK\b|\s*;)", re.IGNORECASE)
_ROLE_IN_LIST = re.compile(_ROLE)
# Not roles: what they stand for exists wherever the policy is created.
_ROLE_KEYWORDS = frozenset({"public", "current_user", "current_role", "session_user"})
_SESSION_ROLE = re.compile(rf"^SET SESSION AUTHORIZATION\s+({_ROLE});")

_FACTS_SQL = """
SELECT 'me', encode(convert_to(current_user, 'UTF8'), 'hex'),
       (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)::text
UNION ALL
SELECT 'role', encode(convert_to(rolname, 'UTF8'), 'hex'),
       pg_has_role(current_user, oid, 'MEMBER')::text FROM pg_roles
UNION ALL
SELECT 'extension', encode(convert_to(e.name, 'UTF8'), 'hex'),
       CASE WHEN e.installed_version IS NOT NULL THEN 'installed'
            WHEN v.superuser AND NOT v.trusted THEN 'superuser' ELSE 'available' END
FROM pg_available_extensions e
LEFT JOIN pg_available_extension_versions v ON v.name = e.name AND v.version = e.default_version
"""


def parse_role_map(pairs: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``OLD=NEW`` pairs (``--role-map``) as a mapping; UsageError for a malformed one."""
    found: dict[str, str] = {}
    for pair in pairs:
        old, sep, new = pair.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise UsageError(f"--role-map {pair!r}: write OLD=NEW (a role of the backup, a "
                             "role of the target)")
        found[old.strip()] = new.strip()
    return found


@dataclass(frozen=True)
class TargetFacts:
    """The target's roles and extensions, as the restoring role sees them."""

    user: str
    superuser: bool
    roles: Mapping[str, bool]  # every role -> whether the restoring role is a member of it
    extensions: Mapping[str, str]  # name -> "installed", "available" or "superuser"

    @classmethod
    def read(cls, session: PsqlSession) -> TargetFacts:
        """Ask the target through ``session`` (after its preflight)."""
        user, superuser = "", False
        roles: dict[str, bool] = {}
        extensions: dict[str, str] = {}
        for kind, name_hex, value in session.run(_FACTS_SQL):
            name = bytes.fromhex(name_hex).decode("utf-8", "replace")
            if kind == "me":
                user, superuser = name, value == "true"
            elif kind == "role":
                roles[name] = value == "true"
            else:
                extensions[name] = value
        return cls(user, superuser, roles, extensions)

    def may_own_as(self, role: str) -> bool:
        """Whether the restoring role may make ``role`` an object's owner."""
        return role in self.roles and (self.superuser or self.roles[role])


@dataclass
class Fit:
    """What the restore does about the target: see ``plan``."""

    skip: set[int] = field(default_factory=set)
    """Dump ids pg_restore leaves out."""
    no_owner: bool = False
    """pg_restore gives every object to the restoring role; ``after`` sets the owners."""
    after: list[str] = field(default_factory=list)
    """Statements run in the restored database once pg_restore is done (grants, owners)."""
    warnings: list[str] = field(default_factory=list)
    """One line per item not restored as it was in the backup."""

    def selection(self, toc: Toc, base: Selection | None) -> Selection | None:
        """``base`` (a partial restore's, or everything) without ``skip``; None: all of it."""
        if not self.skip:
            return base
        keep = {e.dump_id: (e.desc, e.namespace, e.tag) for e in toc.entries
                if e.dump_id not in self.skip
                and (base is None or base.entries.get(e.dump_id) == (e.desc, e.namespace, e.tag))}
        skipped_rows = {(e.namespace, e.tag) for e in toc.entries
                        if e.dump_id in self.skip and e.desc in ("TABLE", "SEQUENCE")}
        rows = base.rows if base is not None else frozenset(
            (e.namespace, e.tag) for e in toc.entries if e.desc in ("TABLE", "SEQUENCE"))
        return Selection(entries=keep, rows=frozenset(rows - skipped_rows),
                         left_out=base.left_out if base is not None else ())


def label(entry: TocEntry) -> str:
    """How a message names an entry's object: ``table public.orders``."""
    if entry.desc == "BLOB":
        return f"large object {entry.tag}"
    if entry.desc in ("FUNCTION", "PROCEDURE", "AGGREGATE"):  # the tag holds the signature
        where = f"{show_name(entry.namespace)}." if entry.namespace else ""
        return f"{entry.desc.lower()} {where}{entry.tag}"
    return f"{entry.desc.lower()} {show_name(entry.namespace, entry.tag)}"


def _unquoted(role: str) -> str:
    return role[1:-1].replace('""', '"') if role.startswith('"') else role.lower()


def _roles_in(statement: str) -> list[tuple[int, int, str]]:
    """(start, end, role) of every role a GRANT/REVOKE/DEFAULT PRIVILEGES statement names."""
    found = []
    for pattern in (_GRANTEE, _FOR_ROLE, _SESSION_ROLE):
        for match in pattern.finditer(statement):
            if match[1] != "PUBLIC":
                found.append((match.start(1), match.end(1), _unquoted(match[1])))
    return found


def _alter_owner(entry: TocEntry, owner: str) -> str | None:
    """``ALTER <kind> <name> OWNER TO owner`` for ``entry``, named from its DROP statement."""
    if entry.desc == "BLOB":
        return f"ALTER LARGE OBJECT {entry.tag} OWNER TO {identifier(owner)}"
    prefix = f"DROP {entry.desc} "
    drop = entry.drop.strip()
    if not drop.startswith(prefix) or not drop.endswith(";"):
        return None
    name = drop[len(prefix):-1].removeprefix("IF EXISTS ")
    return f"ALTER {entry.desc} {name} OWNER TO {identifier(owner)}"


def _extensions(toc: Toc, target: TargetFacts, fit: Fit) -> None:
    """Leave out each extension the target cannot create, and what needs it, by name."""
    cause: dict[int, str] = {}
    for entry in toc.entries:
        if entry.desc != "EXTENSION":
            continue
        state = target.extensions.get(entry.tag)
        if state is None:
            why = "its files are not installed on the target server"
        elif state == "superuser" and not target.superuser:
            why = f"only a superuser may create it, and {target.user} is none"
        else:
            continue
        fit.skip.add(entry.dump_id)
        cause[entry.dump_id] = entry.tag
        fit.warnings.append(f"extension {entry.tag} not restored: {why}")
    changed = bool(cause)
    while changed:  # dependencies may point either way in dump id order
        changed = False
        for entry in toc.entries:
            if entry.dump_id in fit.skip:
                continue
            needed = next((cause[d] for d in entry.deps if d in cause), None)
            if needed is not None:
                fit.skip.add(entry.dump_id)
                cause[entry.dump_id] = needed
                changed = True
                if entry.desc not in ABOUT and entry.desc not in ("TABLE DATA",
                                                                  "SEQUENCE SET"):
                    fit.warnings.append(f"{label(entry)} not restored: it needs extension "
                                        f"{needed}")


def _refusal(shown: str, role: str, target: TargetFacts, what: str) -> str:
    user = target.user
    if role not in target.roles:
        why = "does not exist on the target server: create it first (the backup's globals " \
              "hold it), map it"
    else:
        why = f"{user} is not a member of: map it"
    return (f"{shown} is {what} role {role!r}, which {why} with --role-map "
            f"{role}=ROLE (a role {user} is a member of), or restore with --no-owner (every "
            f"object owned by {user}, no grants)")


def plan(toc: Toc, target: TargetFacts, *, role_map: Mapping[str, str] | None = None,
         no_owner: bool = False, only: Selection | None = None) -> Fit:
    """How to restore ``toc`` onto ``target``; RestoreFailed naming the first object whose
    owner, grantee or policy role it cannot place, and what to do about it. ``only``: a
    partial restore's entries (pgvault must not grant on, own or make a policy for the
    objects it leaves out)."""
    if only is not None:
        picked = set(only.pick(toc))
        toc = Toc(toc.version, toc.int_size, toc.off_size, toc.compressed,
                  [e for e in toc.entries if e.dump_id in picked], toc.end)
    role_map = dict(role_map or {})
    for new in set(role_map.values()):
        if not target.may_own_as(new):
            what = "does not exist on the target" if new not in target.roles else \
                f"is not one {target.user} is a member of"
            raise RestoreFailed(f"--role-map: role {new!r} {what}")
    fit = Fit()
    _extensions(toc, target, fit)
    _policies(toc, target, role_map, fit)  # --no-owner restores policies too
    if no_owner:  # pg_restore --no-owner --no-acl: owners and grants are not restored
        return fit
    owners: dict[int, str] = {}
    moved: dict[str, list[TocEntry]] = {}
    for entry in toc.entries:
        if entry.dump_id in fit.skip or entry.desc not in OWNED_KINDS or not entry.owner:
            continue
        owner = role_map.get(entry.owner, entry.owner)
        if not target.may_own_as(owner):
            if not provider_role(entry.owner):
                raise RestoreFailed(_refusal(label(entry), entry.owner, target, "owned by"))
            moved.setdefault(entry.owner, []).append(entry)
            owner = target.user
        owners[entry.dump_id] = owner
    by_id = {e.dump_id: e for e in toc.entries}
    fit.no_owner = bool(moved) or any(
        owners[i] != by_id[i].owner for i in owners)
    for role, entries in sorted(moved.items()):
        shown = ", ".join(label(e) for e in entries[:3])
        more = f" and {len(entries) - 3} more" if len(entries) > 3 else ""
        why = ("does not exist on the target server" if role not in target.roles
               else f"{target.user} is not a member of it")
        fit.warnings.append(f"owner {role} not restored ({why}): {shown}{more} owned by "
                            f"{target.user} instead")
    _grants(toc, target, role_map, fit)
    if fit.no_owner:
        for entry in toc.entries:
            given = owners.get(entry.dump_id)
            if given is None or given == target.user or entry.identity:
                continue
            alter = _alter_owner(entry, given)
            if alter is None:
                fit.warnings.append(f"owner {given} of {label(entry)} not restored: pgvault "
                                    f"cannot name it; it is owned by {target.user}")
            else:
                fit.after.append(alter)
    return fit


def _grants(toc: Toc, target: TargetFacts, role_map: Mapping[str, str], fit: Fit) -> None:
    """ACL entries naming a mapped or a provider's missing role: run by pgvault instead,
    each GRANT/REVOKE mapped, or left out (and named) when it names a provider role the
    target lacks."""
    by_id = {e.dump_id: e for e in toc.entries}
    for entry in toc.entries:
        if entry.desc not in ("ACL", "DEFAULT ACL") or entry.dump_id in fit.skip:
            continue
        statements = [line for line in entry.acl.splitlines() if line.strip()]
        mentioned = [(s, _roles_in(s)) for s in statements]
        if not any(role in role_map or role not in target.roles
                   for _, roles in mentioned for _, _, role in roles):
            continue
        about = next((by_id[d] for d in entry.deps if d in by_id), entry)
        if entry.desc == "ACL":
            what = label(about)
        else:  # tagged DEFAULT PRIVILEGES FOR TABLES, owned by the FOR ROLE
            where = f" in schema {show_name(entry.namespace)}" if entry.namespace else ""
            what = f"{entry.tag.lower()}{where} of role {entry.owner}"
        kept: list[str] = []
        for statement, roles in mentioned:
            missing = [role for _, _, role in roles
                       if role_map.get(role, role) not in target.roles]
            if missing:
                if not all(provider_role(role) for role in missing):
                    stop = next(r for r in missing if not provider_role(r))
                    raise RestoreFailed(_refusal(what, stop, target, "granted to"))
                fit.warnings.append(f"grant on {what} not restored (role "
                                    f"{missing[0]} does not exist on the target server): "
                                    f"{statement.strip()}")
                continue
            for start, end, role in sorted(roles, reverse=True):
                if role in role_map:
                    statement = statement[:start] + identifier(role_map[role]) + statement[end:]
            kept.append(statement.strip())
        fit.skip.add(entry.dump_id)
        fit.after += kept


@dataclass(frozen=True)
class Policy:
    """A POLICY entry's statement, read: its name, table and roles (where in ``text``)."""

    name: str
    table: str
    restrictive: bool
    text: str
    roles: tuple[tuple[int, int, str], ...]  # (start, end, role as the server spells it)

    @classmethod
    def parse(cls, text: str) -> Policy | None:
        """None for a statement pg_dump does not write (pg_restore then runs it as it is)."""
        match = _POLICY.match(text)
        if match is None:
            return None
        roles: list[tuple[int, int, str]] = []
        if match["roles"] is not None:
            start = match.start("roles")
            roles = [(start + m.start(), start + m.end(), _unquoted(m[0]))
                     for m in _ROLE_IN_LIST.finditer(match["roles"])]
        table = ".".join(_unquoted(part) for part in _ROLE_IN_LIST.findall(match["table"]))
        return cls(_unquoted(match["name"]), table,
                   (match["kind"] or "").upper() == "RESTRICTIVE", text, tuple(roles))

    def label(self) -> str:
        schema, _, table = self.table.rpartition(".")
        return f"policy {show_name('', self.name)} on table {show_name(schema, table)}"

    def with_roles(self, roles: list[str]) -> str:
        """The statement applying to ``roles`` (keywords kept as they were written)."""
        first, last = self.roles[0][0], self.roles[-1][1]
        spelled = ", ".join(r if r in _ROLE_KEYWORDS else identifier(r) for r in roles)
        return self.text[:first] + spelled + self.text[last:]


def _policies(toc: Toc, target: TargetFacts, role_map: Mapping[str, str], fit: Fit) -> None:
    """Each row-level security policy naming a mapped role or one the target lacks.

    A policy's role cannot simply go: ``TO authenticated`` would become ``TO PUBLIC`` and
    grant everyone what one role had. On the target a missing role logs in as nobody, so
    a permissive policy is restored for its other roles, or left out (and named) when none
    is left: the table keeps ROW LEVEL SECURITY enabled, and a permissive policy left out
    can only deny rows, never show more. A restrictive policy left out would show more
    (its filter gone for the roles later given the name), so it is no provider's case:
    like a policy of an ordinary role the target lacks, it stops the restore before
    anything is created, naming the policy, the role and ``--role-map``.
    """
    about: dict[int, list[TocEntry]] = {}
    for entry in toc.entries:
        if entry.desc in ABOUT:
            for dep in entry.deps:
                about.setdefault(dep, []).append(entry)
    for entry in toc.entries:
        if entry.desc != "POLICY" or entry.dump_id in fit.skip:
            continue
        policy = Policy.parse(entry.defn)
        if policy is None:
            continue
        named = [role for _, _, role in policy.roles if role not in _ROLE_KEYWORDS]
        missing = [role for role in named if role not in role_map and role not in target.roles]
        if not missing and not any(role in role_map for role in named):
            continue
        stop = next((r for r in missing if not provider_role(r) or policy.restrictive), None)
        if stop is not None:
            kind = "restrictive policy" if policy.restrictive else "policy"
            raise RestoreFailed(
                f"{policy.label()} applies to role {stop!r}, which does not exist on the "
                f"target server: create it first (the backup's globals hold it) or map it "
                f"with --role-map {stop}=ROLE (a role of the target; a {kind} left out "
                f"would change who sees which rows)")
        kept: list[str] = []
        for _, _, role in policy.roles:
            new = role if role in _ROLE_KEYWORDS else role_map.get(role, role)
            if role not in missing and new not in kept:
                kept.append(new)
        fit.skip.add(entry.dump_id)
        comments = [e for e in about.get(entry.dump_id, []) if e.dump_id not in fit.skip]
        fit.skip.update(e.dump_id for e in comments)  # pg_restore would run them first
        gone = ("role " if len(missing) == 1 else "roles ") + ", ".join(missing)
        if not kept:
            fit.warnings.append(f"{policy.label()} not restored: its {gone} "
                                f"{'does' if len(missing) == 1 else 'do'} not exist on the "
                                "target server (row level security stays on: what the policy "
                                "showed is hidden, never more shown)")
            continue
        if missing:  # said as "not restored: " so that a drill's facts excuse it too
            fit.warnings.append(f"{policy.label()} not restored: for {gone}, which "
                                f"{'does' if len(missing) == 1 else 'do'} not exist on the "
                                f"target server (restored for {', '.join(kept)} only)")
        fit.after.append(policy.with_roles(kept).strip())
        fit.after += [e.defn.strip() for e in comments if e.defn.strip()]


def left_out(lines: list[str]) -> set[str]:
    """The objects (as ``label`` names them: ``extension pg_graphql``, ``view public.v``)
    that the warning lines of a restore's ``Fit`` say were not restored."""
    return {line.split(" not restored", 1)[0] for line in lines
            if " not restored: " in line and not line.startswith(("owner ", "grant "))}
