"""Emails about finished jobs, sent to a real SMTP server (aiosmtpd) on loopback."""

from __future__ import annotations

import contextlib
import email
import email.policy
import logging
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from helpers import (
    PROJECT_YAML,
    Site,
    free_port,
    running_site,
    setup_workspace,
    until,
    user_headers,
    wait_for_request,
)

from jobsite import notify
from jobsite.config import Settings, load_settings
from jobsite.db import Database


class Mailbox:
    """An aiosmtpd handler that keeps every message it is given."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.envelopes: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.envelopes.append(envelope)
        self.messages.append(
            email.message_from_bytes(envelope.content, policy=email.policy.default)
        )
        return "250 Message accepted for delivery"

    async def wait_for(self, count: int, timeout: float = 15.0) -> list[EmailMessage]:
        await until(
            lambda: len(self.messages) >= count,
            timeout,
            f"{count} emails (so far {len(self.messages)})",
        )
        return self.messages


def notifier_for(db: Database, settings: Settings, **kwargs: Any) -> notify.Notifier:
    """A notifier linking to job pages under the site's base URL, as the site makes one."""
    return notify.Notifier(
        db, settings, lambda job_id: f"{settings.base_url}/jobs/{job_id}", **kwargs
    )


def text(message: EmailMessage) -> str:
    """The body as the reader sees it (lines end in CRLF on the wire)."""
    return message.get_content().replace("\r\n", "\n")


@contextlib.contextmanager
def smtp_server(mailbox: Mailbox, port: int, **kwargs: Any) -> Iterator[Controller]:
    controller = Controller(mailbox, hostname="127.0.0.1", port=port, **kwargs)
    controller.start()
    try:
        yield controller
    finally:
        controller.stop()


@pytest.fixture
def mailbox() -> Mailbox:
    return Mailbox()


@pytest.fixture
def smtp_port() -> int:
    return free_port()


@pytest.fixture
def smtp(mailbox: Mailbox, smtp_port: int) -> Iterator[Controller]:
    with smtp_server(mailbox, smtp_port) as controller:
        yield controller


def site_settings(data_dir: Path, smtp_port: int | None, **more: Any) -> Settings:
    smtp = {"host": "127.0.0.1", "port": smtp_port, "starttls": False} if smtp_port else {}
    return load_settings(
        environ={},
        data_dir=str(data_dir),
        base_url="https://jobs.example.org/",
        smtp={"from_addr": "jobsite@example.org", **smtp},
        **more,
    )


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    db = await Database.open(tmp_path / "db.sqlite")
    yield db
    await db.close()


async def all_sent(db: Database) -> bool:
    """Every email in the outbox has been sent: nothing is left that could be sent later."""
    return not await db.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL")


@contextlib.asynccontextmanager
async def running(notifier: notify.Notifier) -> AsyncIterator[notify.Notifier]:
    await notifier.start()
    try:
        yield notifier
    finally:
        await notifier.stop()


# -- what the email says -----------------------------------------------------------------


async def test_requester_gets_an_email_when_a_job_of_a_notify_request_succeeds(
    db, smtp, mailbox, smtp_port, tmp_path
):
    site = await Site.make(db, email="alice@example.org")
    job_id = await site.add_job("generate", duration=125)
    notifier = notifier_for(db, site_settings(tmp_path, smtp_port))
    async with running(notifier):
        await notifier.job_finished(job_id)
        (message,) = await mailbox.wait_for(1)
    # stopping right after the server took the message still records it as sent: the next
    # start must not send it again

    assert message["Subject"] == "Succeeded: [ws1] generate"
    assert message["To"] == "alice@example.org"
    assert message["From"] == "jobsite@example.org"
    assert mailbox.envelopes[0].rcpt_tos == ["alice@example.org"]
    body = text(message)
    assert "Action:     generate" in body
    assert "Workspace:  ws1" in body
    assert "Status:     Succeeded (succeeded)" in body
    assert "Message:    Completed successfully" in body
    assert "Elapsed:    2m 5s" in body
    assert f"https://jobs.example.org/jobs/{job_id}\n" in body
    sent = await db.fetchone("SELECT sent_at, attempts FROM outbox WHERE job_id = ?", (job_id,))
    assert sent["sent_at"] is not None and sent["attempts"] == 1


async def test_an_email_the_last_process_did_not_queue_is_sent_on_start(
    db, smtp, mailbox, smtp_port, tmp_path
):
    # the job was marked finished and the server died before queueing its email
    site = await Site.make(db, email="alice@example.org")
    job_id = await site.add_job("generate")
    await site.add_job("old", created_at=time.time() - 3 * 86400)  # long settled: left alone
    notifier = notifier_for(db, site_settings(tmp_path, smtp_port))
    async with running(notifier):
        (message,) = await mailbox.wait_for(1)
    assert message["Subject"] == "Succeeded: [ws1] generate"
    assert await db.fetchval("SELECT job_id FROM outbox") == job_id
    async with running(notifier_for(db, site_settings(tmp_path, smtp_port))):
        pass  # started again: nothing is queued twice
    assert await db.fetchval("SELECT count(*) FROM outbox") == 1


async def test_a_failed_job_email_gives_the_status_message(db, smtp, mailbox, smtp_port, tmp_path):
    site = await Site.make(db)
    job_id = await site.add_job(
        "analyse",
        state="failed",
        status_code="nonzero_exit",
        status_message="Job exited with an error: exit code 1",
        duration=3 * 3600 + 4,
    )
    notifier = notifier_for(db, site_settings(tmp_path, smtp_port))
    async with running(notifier):
        await notifier.job_finished(job_id)
        (message,) = await mailbox.wait_for(1)
    assert message["Subject"] == "Failed: [ws1] analyse"
    body = text(message)
    assert "Status:     Failed (nonzero_exit)" in body
    assert "Message:    Job exited with an error: exit code 1" in body
    assert "Elapsed:    3h 0m 4s" in body


def test_a_job_cancelled_before_it_started_says_so():
    job = {
        "id": "j1",
        "job_request_id": 7,
        "action": "generate",
        "workspace": "ws1",
        "state": "failed",
        "status_code": "cancelled_by_user",
        "status_message": "Cancelled by user",
        "started_at": None,
        "completed_at": 100.0,
    }
    subject, body = notify.job_email(job, f"http://localhost:8000/jobs/{job['id']}")
    assert subject == "Cancelled: [ws1] generate"
    assert "Elapsed:    did not start" in body
    assert "Finished:   1970-01-01 00:01:40 UTC" in body
    assert "http://localhost:8000/jobs/j1\n" in body


# -- who gets one, and how many ------------------------------------------------------------


async def test_one_email_per_job_even_when_told_twice(db, smtp, mailbox, smtp_port, tmp_path):
    site = await Site.make(db)
    first = await site.add_job("generate")
    second = await site.add_job("analyse", state="failed", status_code="timed_out")
    notifier = notifier_for(db, site_settings(tmp_path, smtp_port))
    async with running(notifier):
        for job_id in (first, second, first):
            await notifier.job_finished(job_id)
        await mailbox.wait_for(2)
        await until(lambda: all_sent(db), message="the outbox to be sent")
    assert sorted(m["Subject"] for m in mailbox.messages) == [
        "Failed: [ws1] analyse",
        "Succeeded: [ws1] generate",
    ]
    assert await db.fetchval("SELECT count(*) FROM outbox") == 2


async def test_no_email_when_the_request_did_not_ask(db, smtp, mailbox, smtp_port, tmp_path):
    site = await Site.make(db)
    job_id = await site.add_job(notify=False)
    notifier = notifier_for(db, site_settings(tmp_path, smtp_port))
    async with running(notifier):
        await notifier.job_finished(job_id)  # an email would be in the outbox once it returns
    assert mailbox.messages == []
    assert await db.fetchval("SELECT count(*) FROM outbox") == 0


async def test_a_requester_without_an_email_address_gets_none_and_it_is_logged(
    db, smtp, mailbox, smtp_port, tmp_path, caplog
):
    site = await Site.make(db, username="bob", email=None)
    job_id = await site.add_job()
    notifier = notifier_for(db, site_settings(tmp_path, smtp_port))
    with caplog.at_level(logging.INFO, logger="jobsite.notify"):
        async with running(notifier):
            await notifier.job_finished(job_id)  # an email would be in the outbox now
    assert mailbox.messages == []
    assert await db.fetchval("SELECT count(*) FROM outbox") == 0
    assert f"job {job_id} finished; bob asked to be notified but has no email address" in (
        caplog.text
    )


# -- failures ----------------------------------------------------------------------------


async def test_a_failed_send_is_retried_until_the_server_is_up(
    db, mailbox, smtp_port, tmp_path, caplog
):
    site = await Site.make(db)
    job_id = await site.add_job()
    notifier = notifier_for(db, site_settings(tmp_path, smtp_port), retry_delay=0.2)
    async with running(notifier):
        await notifier.job_finished(job_id)

        async def outbox_row(done):
            row = await db.fetchone("SELECT * FROM outbox WHERE job_id = ?", (job_id,))
            return row if done(row) else None

        # nothing listens on the port yet
        row = await until(lambda: outbox_row(lambda r: r["attempts"] >= 1), 5, "a first attempt")
        assert row["sent_at"] is None
        assert "Connect" in row["last_error"] or "refused" in row["last_error"], row
        assert "could not send email" in caplog.text

        with smtp_server(mailbox, smtp_port):
            (message,) = await mailbox.wait_for(1)
            # the outbox is updated just after the server says 250
            row = await until(
                lambda: outbox_row(lambda r: r["sent_at"] is not None), 5, "the email marked sent"
            )

    assert message["Subject"] == "Succeeded: [ws1] generate"
    assert row["attempts"] >= 2
    assert row["sent_at"] is not None
    assert row["last_error"] is None


async def test_sending_gives_up_after_the_last_attempt_and_admins_see_why(
    db, smtp_port, tmp_path, caplog, monkeypatch
):
    monkeypatch.setattr(notify, "MAX_ATTEMPTS", 2)
    site = await Site.make(db)
    job_id = await site.add_job()
    settings = site_settings(tmp_path, smtp_port)
    async with running(notifier_for(db, settings, retry_delay=0.05)) as notifier:
        await notifier.job_finished(job_id)
        await until(lambda: "gave up sending email" in caplog.text, 5, "sending to give up")
    # with the sender stopped, an email it would still try would be due now or later
    assert await notifier.send_due() is None
    (email_,) = (await notify.outbox_json(db, settings))["emails"]
    assert email_["status"] == "gave_up"
    assert email_["attempts"] == 2
    assert "Connect" in email_["last_error"] or "refused" in email_["last_error"]
    assert "gave up sending email 1 to alice@example.org after 2 attempts" in caplog.text


async def test_emails_waiting_in_the_outbox_are_sent_after_a_restart(
    db, smtp, mailbox, smtp_port, tmp_path
):
    site = await Site.make(db)
    job_id = await site.add_job()
    settings = site_settings(tmp_path, smtp_port)
    await notifier_for(db, settings).job_finished(job_id)  # queued, never sent: "crash"
    assert mailbox.messages == []
    async with running(notifier_for(db, settings)):
        (message,) = await mailbox.wait_for(1)
    assert message["Subject"] == "Succeeded: [ws1] generate"


async def test_an_email_is_sent_over_starttls_when_the_server_offers_it(
    db, mailbox, smtp_port, tmp_path, monkeypatch
):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the client trusts this test's own CA
    settings = site_settings(tmp_path, smtp_port)
    settings.smtp.starttls = True
    site = await Site.make(db)
    job_id = await site.add_job()
    with smtp_server(mailbox, smtp_port, tls_context=server_tls, require_starttls=True):
        async with running(notifier_for(db, settings)) as notifier:
            await notifier.job_finished(job_id)
            (message,) = await mailbox.wait_for(1)
    assert message["Subject"] == "Succeeded: [ws1] generate"


# -- through the site ----------------------------------------------------------------------


async def test_cancelling_a_notify_request_emails_the_requester(
    data_dir, repos_dir, make_repo, smtp, mailbox, smtp_port
):
    settings = site_settings(data_dir, smtp_port, repos={"allow": [f"{repos_dir}/*"]})
    repo = make_repo({"project.yaml": PROJECT_YAML})
    async with running_site(settings) as (app, client):
        headers = await user_headers(app, "alice", "alice@example.org")
        await setup_workspace(client, headers, repo)
        await app.state.scheduler.set_paused(True)  # keeps the job pending, without Docker
        ids = []
        for notify_me in (True, False):
            response = await client.post(
                "/api/v1/workspaces/ws1/job-requests",
                json={"actions": ["generate"], "notify": notify_me},
                headers=headers,
            )
            assert response.status_code == 201, response.text
            ids.append(response.json()["id"])
            response = await client.post(f"/api/v1/job-requests/{ids[-1]}/cancel", headers=headers)
            assert response.status_code == 200, response.text
        # a cancel returns once the email it causes is in the outbox: one, for one request
        assert await app.state.db.fetchval("SELECT count(*) FROM outbox") == 1
        (message,) = await mailbox.wait_for(1)
        await until(lambda: all_sent(app.state.db), message="the outbox to be sent")
    assert len(mailbox.messages) == 1
    assert message["Subject"] == "Cancelled: [ws1] generate"
    assert message["To"] == "alice@example.org"
    assert "Message:    Cancelled by user" in text(message)


async def test_a_mail_server_that_is_down_does_not_touch_the_job(
    data_dir, repos_dir, make_repo, smtp_port
):
    settings = site_settings(data_dir, smtp_port, repos={"allow": [f"{repos_dir}/*"]})
    repo = make_repo({"project.yaml": PROJECT_YAML})
    async with running_site(settings) as (app, client):  # nothing listens on smtp_port
        headers = await user_headers(app, "alice", "alice@example.org")
        await setup_workspace(client, headers, repo)
        await app.state.scheduler.set_paused(True)
        response = await client.post(
            "/api/v1/workspaces/ws1/job-requests",
            json={"actions": ["generate"], "notify": True},
            headers=headers,
        )
        request_id = response.json()["id"]
        response = await client.post(f"/api/v1/job-requests/{request_id}/cancel", headers=headers)
        assert response.status_code == 200, response.text

        async def attempted():
            row = await app.state.db.fetchone("SELECT attempts, last_error FROM outbox")
            return row if row and row["attempts"] else None

        row = await until(attempted, 5, "an attempt to send the email")
        job = (await client.get(f"/api/v1/job-requests/{request_id}", headers=headers)).json()
    assert row["last_error"], "the send should have failed"
    (cancelled,) = job["jobs"]
    assert (cancelled["state"], cancelled["status_code"]) == ("failed", "cancelled_by_user")
    assert cancelled["status_message"] == "Cancelled by user"


async def test_without_smtp_emails_wait_in_the_outbox_only_admins_see(
    data_dir, repos_dir, make_repo
):
    settings = site_settings(data_dir, None, repos={"allow": [f"{repos_dir}/*"]})
    repo = make_repo({"project.yaml": PROJECT_YAML})
    async with running_site(settings) as (app, client):
        headers = await user_headers(app, "alice", "alice@example.org")
        admin = await user_headers(app, "root", None, admin=True)
        await setup_workspace(client, headers, repo)
        await app.state.scheduler.set_paused(True)
        response = await client.post(
            "/api/v1/workspaces/ws1/job-requests",
            json={"actions": ["generate"], "notify": True},
            headers=headers,
        )
        request_id = response.json()["id"]
        await client.post(f"/api/v1/job-requests/{request_id}/cancel", headers=headers)

        response = await client.get("/api/v1/admin/outbox", headers=headers)
        assert response.status_code == 403
        assert response.json() == {"error": "only site admins can see the outbox"}
        assert (await client.get("/api/v1/admin/outbox")).status_code == 401

        response = await client.get("/api/v1/admin/outbox", headers=admin)
    assert response.status_code == 200
    outbox = response.json()
    assert outbox["smtp_configured"] is False
    (queued,) = outbox["emails"]
    assert queued["to"] == "alice@example.org"
    assert queued["subject"] == "Cancelled: [ws1] generate"
    assert queued["status"] == "not_sent_smtp_not_configured"
    assert queued["sent_at"] is None
    assert "https://jobs.example.org/jobs/" in queued["body"]


@pytest.mark.usefixtures("docker_cleanup")
async def test_a_job_run_in_docker_emails_its_requester_when_it_succeeds(
    settings, make_repo, smtp, mailbox, smtp_port
):
    settings.smtp.host, settings.smtp.port, settings.smtp.starttls = "127.0.0.1", smtp_port, False
    repo = make_repo({"project.yaml": PROJECT_YAML})
    async with running_site(settings) as (app, client):
        headers = await user_headers(app, "alice", "alice@example.org")
        await setup_workspace(client, headers, repo)
        response = await client.post(
            "/api/v1/workspaces/ws1/job-requests",
            json={"actions": ["generate"], "notify": True},
            headers=headers,
        )
        done = await wait_for_request(client, headers, response.json()["id"])
        (message,) = await mailbox.wait_for(1)
    assert done["status"] == "succeeded"
    assert message["Subject"] == "Succeeded: [ws1] generate"
    assert f"{settings.base_url}/jobs/{done['jobs'][0]['id']}" in text(message)
