"""The web console (issue 22): what it shows, who may see it, and how fast.

Real parts: the real `pgvault console` process serving over HTTP on loopback, the
console's own request handling (token, headers, routes), and for the load test the same
status code path `pgvault check` runs. The load test's repository is FAKED: 200
databases' manifests, run histories and drill records written into a MemoryStorage
(pgvault's own in-memory backend, the one the storage contract tests), because taking
200 real backups would take minutes; everything above the storage is the real code.
The browser tests against real backups and drills of a real cluster are in
tests/fixtures_browser.py's users (test_console_browser below).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import socket
import statistics
import subprocess as sp
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from cli_runner import PGVAULT, clean_env, pgvault
from dbcompare import assert_databases_equal
from fixtures_browser import Browser, browser  # noqa: F401  (the fixture)
from fixtures_pg import NewName
from pgvault import config
from pgvault.catalog import Catalog
from pgvault.model import (
    Artifact,
    Manifest,
    RunHistory,
    RunRecord,
    StageSpec,
    VerifyCheck,
    VerifyReport,
    new_backup_id,
    to_dict,
)
from pgvault.ops import jobs
from pgvault.ops.status import HISTORY
from pgvault.storage import open_storage
from pgvault.storage.base import Storage
from pgvault.storage.local import LocalStorage
from pgvault.storage.memory import MemoryStorage
from pgvault.storage.s3 import S3Storage
from pgvault.vault import Vault
from pgvault.web import reads, views
from pgvault.web.app import CSP, Console
from sampledb import fill_sized_database

# The README's screenshots are refreshed on demand, never by a plain run (which would leave
# the checkout changed): PGVAULT_SCREENSHOTS=docs/img scripts/test -k console_browser
SCREENSHOTS = os.environ.get("PGVAULT_SCREENSHOTS")

# -- a faked repository of many databases (MemoryStorage) ---------------------------------


def fake_manifest(database: str, started: datetime, *, size: int = 123_456) -> Manifest:
    backup_id = new_backup_id(started)
    return Manifest(
        id=backup_id, database=database, started_at=started,
        finished_at=started + timedelta(seconds=42), pgvault_version="test",
        artifacts=[Artifact(name="db.dump", key=f"backups/{database}/{backup_id}/db.dump.zst",
                            size=size, sha256="0" * 64, raw_size=size * 4,
                            stages=[StageSpec(name="zstd", level=3)], format="pg_dump-custom")])


def fake_repository(count: int, backups_each: int, now: datetime,
                    storage: Storage | None = None) -> Storage:
    """``count`` databases: every 5th CRITICAL (too old), every 7th with a failed run
    (WARNING), a passing drill on each newest backup; the rest OK. Written into a
    MemoryStorage, then copied (8 at a time) into ``storage`` when one is given."""
    memory = MemoryStorage()
    catalog = Catalog(memory)
    for n in range(count):
        name = f"db{n:03d}"
        newest_age = timedelta(hours=30 if n % 5 == 0 else 2)
        manifests = [fake_manifest(name, now - newest_age - timedelta(days=k))
                     for k in range(backups_each)]
        for manifest in manifests:
            catalog.commit(manifest)
        newest = manifests[0]
        catalog.record_drill(VerifyReport(
            backup_id=newest.id, database=name, level="facts",
            started_at=newest.finished_at, finished_at=newest.finished_at + timedelta(minutes=2),
            checks=[VerifyCheck(level="integrity", name="sha256", status="pass"),
                    VerifyCheck(level="facts", name="row counts", status="pass")],
            restore_seconds=95.0, rto_met=True))
        failure = (RunRecord(at=now - timedelta(hours=1), finished_at=now - timedelta(hours=1),
                             duration=3.0, error="pg_dump: connection refused")
                   if n % 7 == 0 else None)
        history = RunHistory(last_success=RunRecord(
            at=newest.started_at, finished_at=newest.finished_at, duration=42.0,
            backup_id=newest.id, size=newest.size), last_failure=failure,
            failures_total=1 if failure else 0)
        catalog.write_status(name, HISTORY, to_dict(history))
    if storage is None:
        return memory
    target = storage
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda info: target.put_bytes(info.key, memory.read_bytes(info.key)),
                      list(memory.list(""))))
    return storage


def fake_sources(storage: Storage) -> views.Sources:
    settings = config.load({"repo": "memory://"}, {})
    vault = Vault.open(settings, storage=storage)
    names = vault.catalog.databases()
    return lambda: [(name, vault) for name in names]


@pytest.fixture(params=["folder", "s3"])
def many_databases(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    """200 databases in a folder (5 backups each), or in a bucket of moto's S3 server (1
    each: moto lists only a few hundred keys a second on this machine, so 1,000 manifests
    would take seconds of moto's own time per request, and the test minutes)."""
    now = datetime.now(UTC)
    if request.param == "folder":
        yield fake_repository(200, 5, now, LocalStorage(tmp_path / "repo"))
        return
    bucket = request.getfixturevalue("s3_bucket")
    options = request.getfixturevalue("s3_options")
    yield fake_repository(200, 1, now, S3Storage(bucket, "many", options))


def _list_records(storage: Storage) -> float:
    """Seconds the store itself takes to list the four record folders side by side (what
    every request costs at least, whoever asks)."""
    started = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda prefix: list(storage.list(prefix)), reads.RECORD_PREFIXES))
    return time.perf_counter() - started


def test_overview_of_200_databases_renders_in_under_a_second_at_p95(
        many_databases: Storage) -> None:
    """200 databases (a faked repository: see the module docstring) in a folder and on S3
    (moto), GETs of the overview through the console's request handling: p95 under 1 s
    over 100 requests from a folder; on moto (5 requests after the first), each request
    within 1 s of what moto itself takes to list the records (timed right after it: moto
    lists a few hundred keys a second here, real S3 a thousand in one 50-100 ms page).
    Each request lists the repository again: a new backup and a removed one show at once."""
    storage = many_databases
    on_s3 = storage.url.startswith("s3:")
    now = datetime.now(UTC)
    console = Console(fake_sources(storage), host="127.0.0.1", token=None)
    times, listings = [], []
    for _ in range(6 if on_s3 else 100):
        started = time.perf_counter()
        response = console.answer("GET", "/", {})
        times.append(time.perf_counter() - started)
        assert response.status == 200
        if on_s3:
            listings.append(_list_records(storage))
    body = response.body.decode()
    assert body.count('<tr class="row-') == 200
    p50 = statistics.median(times)
    p95 = statistics.quantiles(times, n=20, method="inclusive")[-1]
    print(f"\noverview of 200 databases ({storage.url.split(':')[0]}): p50 {p50 * 1000:.0f} ms, "
          f"p95 {p95 * 1000:.0f} ms, first {times[0] * 1000:.0f} ms, "
          f"max {max(times) * 1000:.0f} ms over {len(times)} requests")
    if on_s3:
        beyond = [t - listed for t, listed in zip(times[1:], listings[1:], strict=True)]
        print(f"moto's own listing of the record folders: p50 "
              f"{statistics.median(listings) * 1000:.0f} ms; the console beyond it: p50 "
              f"{statistics.median(beyond) * 1000:.0f} ms, max {max(beyond) * 1000:.0f} ms")
        assert max(beyond) < 1.0
    else:
        assert p95 < 1.0
    # Worst first: every CRITICAL row before every WARNING one, every WARNING before OK.
    states = re.findall(r'data-state="(\w+)"', body)
    order = {"UNKNOWN": 0, "CRITICAL": 1, "WARNING": 2, "OK": 3}
    assert states == sorted(states, key=order.__getitem__)
    assert states.count("CRITICAL") == 40 and "WARNING" in states and "OK" in states
    # The same verdicts as `pgvault check`, database by database (read through one view:
    # 200 databases' records one by one would take moto a quarter of a minute).
    vault = Vault.open(config.load({"repo": "memory://"}, {}),
                       storage=console._reads[id(storage)].view())
    for name, state in zip(re.findall(r'data-database="(\w+)"', body), states, strict=True):
        verdict = jobs.status_of(vault, name).verdict(now, warn_drill_age_days=8.0)
        assert verdict.name == state, name
    # Read from the repository on each request: a new backup of a CRITICAL database and a
    # rewritten run history show on the next page, a removed manifest goes from it.
    catalog = Catalog(storage)
    catalog.commit(fake_manifest("db000", now - timedelta(minutes=5)))
    catalog.delete(catalog.list("db001")[-1])
    body = console.answer("GET", "/", {}).body.decode()
    assert 'data-database="db000" data-state="WARNING"' in body  # fresh now; failed run
    page = console.answer("GET", "/db/db001", {}).body.decode()
    assert page.count("<tr data-backup=") == (0 if on_s3 else 4)
    # The database page of one of them, timed too.
    started = time.perf_counter()
    page_answer = console.answer("GET", "/db/db005", {})
    took = time.perf_counter() - started
    listed = _list_records(storage) if on_s3 else 0.0  # moto's own share, as above
    print(f"database page (its backups, retention plan, drills): {took * 1000:.0f} ms"
          + (f", moto's listing {listed * 1000:.0f} ms" if on_s3 else ""))
    assert page_answer.status == 200 and b"CRITICAL" in page_answer.body
    assert took - listed < 1.0


def test_a_request_lists_each_record_folder_once_and_reads_only_what_changed() -> None:
    """The read view: four listings per overview of 30 databases, and after the first
    request, reads only of records the listing shows as new or rewritten."""
    storage = fake_repository(30, 3, datetime.now(UTC))
    cache = reads.Reads(storage)
    first = cache.view()
    vault = Vault.open(config.load({"repo": "memory://"}, {}), storage=first)
    views.overview([(f"db{n:03d}", vault) for n in range(30)], datetime.now(UTC))
    assert first.requests == 4 + 30 * 3 + 30 + 30  # listings, manifests, drills, histories
    again = cache.view()
    vault = Vault.open(config.load({"repo": "memory://"}, {}), storage=again)
    Catalog(storage).write_status("db003", HISTORY, {"last_success": None})
    rows = views.overview([(f"db{n:03d}", vault) for n in range(30)], datetime.now(UTC))
    assert again.requests == 4 + 1
    assert next(r for r in rows if r.database == "db003").last_error == ""


def test_every_answer_is_locked_down_and_beyond_loopback_needs_the_token() -> None:
    storage = fake_repository(3, 2, datetime.now(UTC))
    sources = fake_sources(storage)
    token = "t0ken-" + uuid.uuid4().hex
    # Beyond loopback without a token: nothing is shown.
    locked = Console(sources, host="0.0.0.0", token=None)
    assert locked.answer("GET", "/", {}).status == 403
    assert b"db000" not in locked.answer("GET", "/", {}).body
    console = Console(sources, host="0.0.0.0", token=token)
    refused = console.answer("GET", "/", {})
    assert refused.status == 401 and b"db000" not in refused.body
    assert console.answer("GET", "/db/db000", {"Authorization": "Bearer wrong"}).status == 401
    assert console.answer("GET", "/", {"Authorization": f"Bearer {token}"}).status == 200
    # The login form: a wrong token is refused, the right one sets a session cookie that is
    # not the token itself.
    import io

    def login(given: str) -> tuple[int, dict[str, str]]:
        form = f"token={given}".encode()
        answer = console.answer("POST", "/login", {"Content-Length": str(len(form))},
                                io.BytesIO(form))
        return answer.status, dict(answer.headers)

    assert login("nope")[0] == 401
    status, headers = login(token)
    assert status == 303 and token not in headers["Set-Cookie"]
    assert "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
    cookie = headers["Set-Cookie"].split(";")[0]
    assert console.answer("GET", "/", {"Cookie": cookie}).status == 200
    assert console.answer("GET", "/", {"Cookie": cookie + "x"}).status == 401
    # Read-only: nothing but the login accepts a POST.
    assert console.answer("POST", "/", {"Authorization": f"Bearer {token}"}).status == 405
    # On loopback without a token, pages are open (as /status is).
    assert Console(sources, host="127.0.0.1", token=None).answer("GET", "/", {}).status == 200


@pytest.fixture
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str, headers: dict[str, str] | None = None
        ) -> tuple[int, dict[str, str], str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path, headers=headers or {})
    answer = conn.getresponse()
    body = answer.read().decode()
    conn.close()
    return answer.status, {k.lower(): v for k, v in answer.getheaders()}, body


@contextlib.contextmanager
def console_process(*args: str, env: dict[str, str] | None = None,
                    port: int) -> Iterator[sp.Popen[str]]:
    """A real `pgvault console` process, once it answers /healthz; SIGTERM after."""
    full = clean_env() | (env or {})
    proc = sp.Popen([PGVAULT, "console", *args], env=full, stdout=sp.PIPE, stderr=sp.PIPE,
                    text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if get(port, "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                out, err = proc.communicate(timeout=5)
                raise AssertionError(f"console did not start ({proc.returncode}): {out}{err}")
            time.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=20)


def test_console_beyond_loopback_refuses_to_start_without_a_token(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    proc = pgvault("console", "--repo", f"file://{repo}", "--listen", "0.0.0.0:1", expect=3)
    assert "beyond loopback" in proc.stderr and "token_file" in proc.stderr
    (tmp_path / "short").write_text("abc\n")
    short = pgvault("console", "--repo", f"file://{repo}", "--listen", "127.0.0.1:1",
                    env={"PGVAULT_CONSOLE_TOKEN_FILE": str(tmp_path / "short")}, expect=3)
    assert "shorter than 16" in short.stderr


# -- real backups and drills of a real cluster, in a real browser ----------------------


def _database(pg_cluster: object, new_name: NewName, rows: int) -> tuple[str, str]:
    name = new_name()
    base = pg_cluster.url()  # type: ignore[attr-defined]
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = pg_cluster.url(name)  # type: ignore[attr-defined]
    fill_sized_database(url, rows)
    return name, url


def test_console_browser(pg_cluster: object, new_name: NewName, tmp_path: Path,
                         browser: Browser, free_port: int) -> None:  # noqa: F811
    """Three real databases, real backups and drills, the real `pgvault console` process
    behind a token on 0.0.0.0, read by headless Chromium: order by state, ages, a damaged
    backup, a drill's checks, no secret, the CSP; screenshots for the README."""
    shots = Path(SCREENSHOTS).resolve() if SCREENSHOTS else tmp_path / "img"
    good, good_url = _database(pg_cluster, new_name, 1500)
    damaged, _ = _database(pg_cluster, new_name, 800)
    stale, _ = _database(pg_cluster, new_name, 500)
    repo = f"file://{tmp_path / 'repo'}"
    secret = "s3cr3t-" + uuid.uuid4().hex
    token_file = tmp_path / "console-token"
    token = uuid.uuid4().hex + uuid.uuid4().hex
    token_file.write_text(token + "\n")
    cfg = tmp_path / "pgvault.toml"
    base = pg_cluster.url()  # type: ignore[attr-defined]
    cfg.write_text(f"""
repo = "{repo}"
[check]
warn_drill_age_days = 0
[console]
token_file = "{token_file}"
actions = true
[[databases]]
name = "{good}"
[[databases]]
name = "{damaged}"
[[databases]]
name = "{stale}"
objectives = {{ rpo_hours = 0.0005 }}
""")
    cfg.chmod(0o600)
    env = {"DATABASE_URL": base}
    pgvault("backup", "--config", str(cfg), "-d", good, env=env)
    with psycopg.connect(good_url, autocommit=True) as conn:  # a second point on the charts
        conn.execute("UPDATE events SET payload = NULL WHERE id % 3 = 0")
    pgvault("backup", "--config", str(cfg), "-d", good, env=env)
    pgvault("verify", "latest", "--config", str(cfg), "-d", good, "--level", "restore")
    pgvault("backup", "--config", str(cfg), "-d", damaged, env=env)
    time.sleep(1.1)  # backup ids are per second
    pgvault("backup", "--config", str(cfg), "-d", damaged, env=env)
    pgvault("backup", "--config", str(cfg), "-d", stale, env=env)
    storage = open_storage(repo)
    catalog = Catalog(storage)
    bad = catalog.list(damaged)[-1]
    artifact = bad.artifacts[0]
    data = bytearray(storage.read_bytes(artifact.key))
    data[len(data) // 2] ^= 0xFF  # a flipped byte in the stored dump
    storage.put_bytes(artifact.key, bytes(data))
    drill = pgvault("verify", bad.id, "--config", str(cfg), "-d", damaged, "--level",
                    "integrity", expect=None)
    assert drill.returncode != 0
    older = catalog.list(damaged)[0]
    # The older backup still proves itself: the database is WARNING (one backup cannot be
    # trusted), not CRITICAL (its last drill failed).
    pgvault("verify", older.id, "--config", str(cfg), "-d", damaged, "--level", "integrity")
    time.sleep(2)  # the stale database's RPO (1.8 s) has passed
    good_manifest = catalog.list(good)[-1]

    # A password in the console's environment (unused by the trust cluster): never shown.
    with console_process("--config", str(cfg), "--listen", f"0.0.0.0:{free_port}",
                         env=env | {"PGPASSWORD": secret}, port=free_port):
        status, headers, body = get(free_port, "/")
        assert status == 401 and good not in body
        assert headers["content-security-policy"] == CSP
        status, headers, body = get(free_port, "/", {"Authorization": f"Bearer {token}"})
        assert status == 200 and secret not in body and token not in body
        for header in ("content-security-policy", "x-content-type-options", "x-frame-options"):
            assert header in headers
        url = f"http://127.0.0.1:{free_port}"
        browser.get(url + "/")
        assert browser.title().startswith("Log in")
        browser.fill("#token", token)
        browser.click("form.login button")
        browser.wait_for("#overview")
        rows = browser.attributes("#overview tbody tr", "data-database")
        states = browser.attributes("#overview tbody tr", "data-state")
        assert rows == [stale, damaged, good], (rows, states)
        assert states == ["CRITICAL", "WARNING", "OK"]
        text = browser.text("#overview")
        assert "newest backup is" in text and "(RPO 0.0005h)" in text
        assert "1 backup cannot be trusted" in text
        assert secret not in browser.source() and token not in browser.source()
        # Ages: the good database's newest backup, as old as its manifest says.
        age = float(browser.attributes(f'tr[data-database="{good}"] td.newest',
                                       "data-age-seconds")[0])
        expected = (datetime.now(UTC) - good_manifest.started_at).total_seconds()
        assert abs(age - expected) < 15, (age, expected)
        assert browser.css_color(f'tr[data-database="{stale}"] .state') == "rgba(176, 0, 32, 1)"
        shots.mkdir(parents=True, exist_ok=True)
        browser.screenshot(shots / "console-overview.png", width=1280, height=560)
        browser.screenshot(shots / "console-phone.png", width=390, height=844)

        browser.click(f'tr[data-database="{damaged}"] a')
        browser.wait_for("#backups")
        trust = browser.text(f'#backups tr[data-backup="{bad.id}"] .trust')
        assert trust.startswith("DAMAGED") and "integrity check failed" in trust
        assert browser.text(f'#backups tr[data-backup="{older.id}"] .trust').startswith("good")
        assert "FAIL" in browser.text(f'section[data-drill="{bad.id}"]')
        commands = browser.text(".commands")
        assert f"pgvault restore {older.id} --from-database {damaged} --to {damaged}_restored" \
            in commands

        browser.get(url + f"/db/{good}")
        browser.wait_for("#backups")
        checks = browser.text(f'section[data-drill="{good_manifest.id}"]')
        assert "PASS" in checks and "restore" in checks
        assert "kept: " in browser.text("#backups")
        assert "kept" in browser.text("#plan")  # the retention plan with its reasons
        assert secret not in browser.source()
        # The charts: inline SVG with a title and a table behind each.
        for chart in ("chart-size", "chart-duration", "chart-rto"):
            assert browser.attributes(f"#{chart} svg", "role") == ["img"]
            assert browser.attributes(f"#{chart} svg title", "id")
            assert browser.attributes(f"#{chart} table tbody tr", "class")
        # Keyboard and labels: every control is labelled; Tab reaches the skip link, then
        # the actions, each with a visible focus ring.
        assert browser.unlabelled_inputs() == []
        focused = browser.tab()
        assert focused["text"] == "Skip to content" and not focused["outline"].startswith("none")
        reached = [browser.tab() for _ in range(6)]
        backup_now = next(f for f in reached if f["id"] == "backup-now")
        assert not backup_now["outline"].startswith("none"), backup_now
        browser.screenshot(shots / "console-database.png", width=1280, height=900)
        browser.viewport(390, 844)
        assert browser.overflow() <= 0, "the database page is wider than a phone"
        browser.screenshot(shots / "console-database-phone.png", width=390, height=844)

        # Restore into a new database: refused at the server for an existing target and
        # for a missing confirmation (the page's own `required` removed first), then done.
        browser.get(url + f"/db/{good}")
        browser.click("#restore-newest")
        browser.wait_for("#restore-form")
        assert browser.unlabelled_inputs() == []
        assert f"pgvault restore {good_manifest.id} --from-database {good} --to NEW_NAME" \
            in browser.text("#restore-command")
        browser.fill("#target", damaged)
        browser.fill("#confirm", damaged)
        browser.click("#restore-form button")
        browser.wait_for("#message")
        assert "already exists" in browser.text("#message"), browser.text("#message")
        browser.get(url + f"/db/{good}/restore?backup={good_manifest.id}")
        browser.wait_for("#restore-form")
        target = new_name()
        browser.script("document.getElementById('confirm').removeAttribute('required')")
        browser.fill("#target", target)
        browser.click("#restore-form button")
        browser.wait_for("#message")
        assert "confirm" in browser.text("#message")
        browser.get(url + f"/db/{good}/restore?backup={good_manifest.id}")
        browser.wait_for("#restore-form")
        browser.fill("#target", target)
        browser.fill("#confirm", target)
        browser.screenshot(shots / "console-restore.png", width=1280, height=560)
        browser.click("#restore-form button")
        browser.wait_for("#job")
        deadline = time.monotonic() + 60
        while browser.attributes("#job", "data-state") in ([], ["running"]):
            assert time.monotonic() < deadline, browser.source()[:2000]
            time.sleep(0.3)  # the page reloads itself (meta refresh) while the job runs
        assert browser.attributes("#job", "data-state") == ["succeeded"], browser.text("#job")
        assert f"restored {good_manifest.id}" in browser.text("#job")
        assert f"pgvault restore {good_manifest.id} --from-database {good} --to {target}" \
            in browser.text("dl")
        assert browser.attributes("#result a", "href")[0].endswith(
            f"/db/{good}#backup-{good_manifest.id}")
        assert secret not in browser.source() and token not in browser.source()
    # What the console showed as good, it restored, and the copy matches its source.
    assert_databases_equal(good_url, pg_cluster.url(target))  # type: ignore[attr-defined]
    assert os.path.getsize(shots / "console-overview.png") > 10_000


def test_the_daemon_serves_the_console_beside_metrics_and_status(
        tmp_path: Path, free_port: int) -> None:
    """A real `pgvault daemon` process: the console at /, its last error and next runs;
    with a token, /status and the pages need it, /healthz and /metrics never do."""
    repo = tmp_path / "repo"
    repo.mkdir()
    cfg = tmp_path / "pgvault.toml"
    cfg.write_text(f"""
repo = "file://{repo}"
[schedule]
backup = "0 1 1 1 *"
retries = 0
[console]
actions = true
[[databases]]
name = "ledger"
""")
    token = uuid.uuid4().hex
    env = {"PGVAULT_CONSOLE_TOKEN": token,
           # Nothing listens there: the catch-up backup at start fails at once.
           "DATABASE_URL": "postgresql://app@127.0.0.1:1/ledger"}
    full = clean_env() | env
    proc = sp.Popen([PGVAULT, "daemon", "--config", str(cfg), "--listen",
                     f"127.0.0.1:{free_port}"], env=full, stdout=sp.PIPE, stderr=sp.PIPE,
                    text=True)
    auth = {"Authorization": f"Bearer {token}"}
    try:
        deadline = time.monotonic() + 30
        body = ""
        while "connection" not in body.lower() or "refused" not in body.lower():
            assert proc.poll() is None and time.monotonic() < deadline, body
            time.sleep(0.2)
            try:
                status, _, body = get(free_port, "/", auth)
            except OSError:
                continue
        assert status == 200 and 'data-state="CRITICAL"' in body and "no complete backup" in body
        assert "Next runs" in body and "backup 20" in body  # the scheduler's next backup
        assert get(free_port, "/")[0] == 401
        assert get(free_port, "/status")[0] == 401
        assert get(free_port, "/db/ledger")[0] == 401
        status, _, body = get(free_port, "/status", auth)
        assert status == 200 and json.loads(body)["databases"][0]["database"] == "ledger"
        assert get(free_port, "/healthz")[0] == 200 and get(free_port, "/metrics")[0] == 200
        status, headers, page = get(free_port, "/db/ledger", auth)
        assert status == 200 and headers["content-security-policy"] == CSP
        assert "pgvault backup -d ledger --config" in page
        assert 'id="backup-now"' in page and "actions enabled" in page
        # An action needs the token and this page's CSRF token, over real HTTP too.
        conn = http.client.HTTPConnection("127.0.0.1", free_port, timeout=10)
        conn.request("POST", "/db/ledger/backup", body="csrf=x", headers=auth | {
            "Content-Type": "application/x-www-form-urlencoded"})
        assert conn.getresponse().status == 403
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", free_port, timeout=10)
        conn.request("POST", "/db/ledger/backup", body="")
        assert conn.getresponse().status == 401
        conn.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0


# -- actions: checked at the server, CSRF, events, no secret ------------------------------


def _form_token(body: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', body)
    assert found, "no CSRF token in the page"
    return found.group(1)


def _post(console: Console, path: str, form: dict[str, str], cookie: str = "",
          client: str = "127.0.0.1") -> tuple[int, str, str]:
    """A raw POST (no page, no browser): status, Location, body."""
    import io
    from urllib.parse import urlencode

    data = urlencode(form).encode()
    headers = {"Content-Length": str(len(data))} | ({"Cookie": cookie} if cookie else {})
    answer = console.answer("POST", path, headers, io.BytesIO(data), client=client)
    return answer.status, dict(answer.headers).get("Location", ""), answer.body.decode()


def _finished(console: Console, location: str, timeout: float = 60.0) -> str:
    """The job page once the job is no longer running."""
    assert location.startswith("/jobs/"), location
    deadline = time.monotonic() + timeout
    while True:
        body = console.answer("GET", location, {}).body.decode()
        if 'data-state="running"' not in body:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.1)


def test_actions_are_checked_at_the_server_behind_csrf_and_announced_with_who(
        pg_cluster: object, make_db: object, new_name: NewName, tmp_path: Path,
        recorder: object, caplog: pytest.LogCaptureFixture) -> None:
    """Real cluster, real backups, the console's own request handling with raw POSTs that
    bypass every page: CSRF (none, wrong, another browser's) is 403; a restore into the
    source, a system database, an existing database, a URL, or without the confirmation is
    refused and creates nothing; pin, unpin and a backup run and are announced (webhook)
    as action.* events naming who asked; a canary password in the database URL is in no
    page, no event and no log line."""
    import logging

    from pgvault.cli.web import _actions, _sources
    from pgvault.redact import scope

    caplog.set_level(logging.DEBUG)
    source_url = make_db(prefix="src")  # type: ignore[operator]
    fill_sized_database(source_url, 300)
    source = source_url.rsplit("/", 1)[1]
    other = new_name()
    with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:  # type: ignore[attr-defined]
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(other)))
    canary = "canary-" + uuid.uuid4().hex
    server = pg_cluster.url().rsplit("/", 1)[0]  # type: ignore[attr-defined]
    with_password = server.replace("://", f"://:{canary}@", 1).replace(":@", "@") \
        if "@" not in server else server.replace("@", f":{canary}@", 1)
    repo = tmp_path / "repo"
    cfg = tmp_path / "pgvault.toml"
    cfg.write_text(f"""
repo = "file://{repo}"
[console]
actions = true
[verify]
server = "{server}/postgres"
[notify]
webhook_url = "{recorder.url}/hook"
events = ["all"]
[[repos]]
name = "main"
url = "file://{repo}"
primary = true
[[repos]]
name = "offsite"
url = "file://{tmp_path / 'offsite'}"
[[databases]]
name = "{source}"
url_env = "SOURCE_URL"
""")  # type: ignore[attr-defined]
    env = {"SOURCE_URL": f"{with_password}/{source}", "PATH": os.environ["PATH"]}
    settings = config.load({}, env, cfg)
    with scope():
        config.register_secrets(settings)
        pgvault("backup", "--config", str(cfg), env=env)
        console = Console(_sources(settings), host="127.0.0.1", token=None,
                          actions=_actions(settings))
        page = console.answer("GET", f"/db/{source}", {})
        body = page.body.decode()
        cookie = dict(page.headers)["Set-Cookie"].split(";")[0]
        token = _form_token(body)
        assert f'action="/db/{source}/backup"' in body and canary not in body
        # Copies: the overview and the page say n of m in sync, from ops.copy.lag.
        assert "0 of 1 in sync" in console.answer("GET", "/", {}).body.decode()
        pgvault("copy", "--config", str(cfg), env=env)
        assert "1 of 1 in sync" in console.answer("GET", "/", {}).body.decode()
        assert "offsite" in re.search(r'<dd id="copies">(.*?)</dd>', console.answer(
            "GET", f"/db/{source}", {}).body.decode()).group(1)  # type: ignore[union-attr]
        ok = {"csrf": token}
        # CSRF: missing, wrong, or right token with another browser's cookie: 403.
        assert _post(console, f"/db/{source}/backup", {})[0] == 403
        assert _post(console, f"/db/{source}/backup", {}, cookie)[0] == 403
        assert _post(console, f"/db/{source}/backup", {"csrf": "0" * 64}, cookie)[0] == 403
        assert _post(console, f"/db/{source}/backup", ok, "pgvault_csrf=other")[0] == 403
        # Restore targets the server refuses, whatever the page allowed.
        refusals = {
            source: 409, "postgres": 409, "template1": 409, "Template0": 409, other: 409,
            "postgresql://elsewhere/x": 400, "host=elsewhere dbname=x": 400, "": 400,
        }
        for target, status in refusals.items():
            got, _, text = _post(console, f"/db/{source}/restore",
                                 ok | {"target": target, "confirm": target}, cookie)
            assert got == status, (target, got, text)
            assert "Refused" in text and canary not in text
        fresh = new_name()
        got, _, text = _post(console, f"/db/{source}/restore", ok | {"target": fresh}, cookie)
        assert got == 400 and "confirm" in text
        got, _, text = _post(console, f"/db/{source}/restore",
                             ok | {"target": fresh, "confirm": fresh + "x"}, cookie)
        assert got == 400
        with psycopg.connect(pg_cluster.url()) as conn:  # type: ignore[attr-defined]
            assert conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s",
                                (fresh,)).fetchone() == (0,)
        # Pin, unpin, back up now: each a job, each announced with who asked.
        newest = Catalog(open_storage(f"file://{repo}")).list(source)[-1]
        got, location, _ = _post(console, f"/db/{source}/pin",
                                 ok | {"backup": newest.id, "reason": "before the migration"},
                                 cookie)
        assert got == 303
        assert "SUCCEEDED" in _finished(console, location)
        assert Catalog(open_storage(f"file://{repo}")).get(newest.id).pin is not None
        assert _post(console, f"/db/{source}/pin", ok | {"backup": newest.id}, cookie)[0] == 400
        got, location, _ = _post(console, f"/db/{source}/unpin", ok | {"backup": newest.id},
                                 cookie)
        assert "SUCCEEDED" in _finished(console, location)
        assert Catalog(open_storage(f"file://{repo}")).get(newest.id).pin is None
        got, location, _ = _post(console, f"/db/{source}/backup", ok, cookie)
        job = _finished(console, location)
        assert "SUCCEEDED" in job and "pgvault backup -d" in job and canary not in job
        assert len(Catalog(open_storage(f"file://{repo}")).list(source)) == 2
        # Drill now: a restore drill on the [verify] server, its report linked.
        got, location, _ = _post(console, f"/db/{source}/drill", ok | {"backup": newest.id},
                                 cookie)
        job = _finished(console, location)
        assert "SUCCEEDED" in job and f"#drill-{newest.id}" in job, job
        assert Catalog(open_storage(f"file://{repo}")).drills(source, newest.id)
        assert f'id="drill-{newest.id}"' in console.answer("GET", f"/db/{source}", {}).body.decode()
        hooks = recorder.wait_for("/hook", 8, match=lambda r: r.json()["event"].startswith(
            "action."))  # type: ignore[attr-defined]
        actions = [(r.json()["event"], r.json()["details"]["action"]) for r in hooks]
        assert ("action.succeeded", "backup") in actions and ("action.started", "pin") in actions
        assert all(r.json()["details"]["who"] == "loopback from 127.0.0.1" for r in hooks)
        assert recorder.wait_for("/hook", match=lambda r: r.json()[  # type: ignore[attr-defined]
            "event"] == "backup.succeeded"), "the backup ran as a job (its own events)"
        everything = [console.answer("GET", p, {}).body.decode()
                      for p in ("/", f"/db/{source}", f"/db/{source}/restore", location)]
    assert not any(canary in text for text in everything)
    assert not any(canary in r.body.decode() for r in recorder.requests)  # type: ignore[attr-defined]
    assert canary not in caplog.text
    assert "console: loopback from 127.0.0.1 asked backup of" in caplog.text
