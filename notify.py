"""Email when a job finishes, for job requests submitted with "Notify me".

An email is first written to the ``outbox`` table, in the same breath as the job's end is
known, and only then sent by a background task. Sending can fail (the mail server is down,
a password changed) without touching the job, and an email waiting to be sent survives a
restart. Failed sends are retried with a growing delay; after ``MAX_ATTEMPTS`` the email
stays in the outbox with its last error, where a site admin can see it
(``GET /api/v1/admin/outbox``). A site without SMTP settings keeps every email there.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any
from urllib.parse import urlsplit

import aiosmtplib

from .auth import load_user
from .config import Settings
from .db import Database, Row
from .states import State, StatusCode
from .units import elapsed, iso_ms, when

log = logging.getLogger("jobsite.notify")

# seconds a stopping site waits for the email on the wire to be sent and recorded
STOP_WAIT = 5.0
MAX_ATTEMPTS = 30  # 30 s, 1 m, 2 m ... then hourly: about a day of retries
RETRY_DELAY = 30.0  # seconds before the first retry; doubled each time
MAX_RETRY_DELAY = 3600.0
# a job that finished this recently without its email queued (the server stopped between
# the two writes) has it queued when the site starts again
MISSED_WITHIN = 86400.0


def status_word(state: str, status_code: str) -> str:
    """The one word a subject line starts with."""
    if state == State.SUCCEEDED:
        return "Succeeded"
    if status_code == StatusCode.CANCELLED_BY_USER:
        return "Cancelled"
    return "Failed"


def job_email(job: Row, job_url: str, show_log: bool = False) -> tuple[str, str]:
    """Subject and body of the email about a finished ``job`` (a row with its workspace),
    linking to its page at ``job_url``; with ``show_log`` (the requester may read the
    job's log), a failed job's last log lines too."""
    word = status_word(job["state"], job["status_code"])
    subject = f"{word}: [{job['workspace']}] {job['action']}"
    if job["started_at"] is None:
        took = "did not start"
    else:
        took = elapsed((job["completed_at"] or time.time()) - job["started_at"])
    finished = when(job["completed_at"] or time.time())
    body = (
        f"The job for action {job['action']} in workspace {job['workspace']} has finished.\n"
        "\n"
        f"Action:     {job['action']}\n"
        f"Workspace:  {job['workspace']}\n"
        f"Status:     {word} ({job['status_code']})\n"
        f"Message:    {job['status_message']}\n"
        f"Elapsed:    {took}\n"
        f"Finished:   {finished}\n"
        "\n"
        + (
            f"The last lines of its log:\n{job['log_excerpt']}\n\n"
            if show_log and job["log_excerpt"]
            else ""
        )
        + "The job's timeline and log:\n"
        f"{job_url}\n"
        "\n"
        f"You get this email because job request {job['job_request_id']} was submitted with "
        '"Notify me".\n'
    )
    return subject, body


class Notifier:
    """Queues an email per finished job of a "Notify me" request, and sends the queue."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        job_url: Callable[[str], str],
        retry_delay: float = RETRY_DELAY,
    ) -> None:
        """``job_url(job_id)`` is the address of the job's page, for the email's link."""
        self.db = db
        self.settings = settings
        self.job_url = job_url
        self.retry_delay = retry_delay
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False

    async def start(self) -> None:
        self._stopping = False
        await self.queue_missed()
        if self.settings.smtp.enabled:
            self._task = asyncio.create_task(self._send_loop(), name="jobsite-outbox")
        else:
            log.info("smtp.host is not set: emails stay in the outbox for admins to see")

    async def stop(self) -> None:
        """Stops sending once the email on the wire (if any) is sent and recorded, so that
        the next start sends it no second time; one that takes longer than STOP_WAIT is
        cut off (and sent again by the next start)."""
        if self._task is None:
            return
        self._stopping = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), STOP_WAIT)
        except TimeoutError:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._task = None

    async def job_finished(self, job_id: str) -> None:
        """The scheduler's hook: queue the email about ``job_id`` if its requester asked."""
        job = await self.db.fetchone(
            "SELECT j.id, j.job_request_id, j.action, j.state, j.status_code, j.status_message, "
            "j.log_excerpt, j.started_at, j.completed_at, w.name AS workspace, w.project_id, "
            "r.notify, r.created_by, u.username, u.email "
            "FROM jobs j JOIN job_requests r ON r.id = j.job_request_id "
            "JOIN workspaces w ON w.id = j.workspace_id JOIN users u ON u.id = r.created_by "
            "WHERE j.id = ?",
            (job_id,),
        )
        if job is None or not job["notify"]:
            return
        if not job["email"]:
            log.info(
                "job %s finished; %s asked to be notified but has no email address, so no "
                "email was sent (an email address on their account would have it sent)",
                job_id,
                job["username"],
            )
            return
        requester = await load_user(self.db, job["created_by"])
        show_log = bool(requester and requester.can_view_outputs(job["project_id"]))
        subject, body = job_email(job, self.job_url(job_id), show_log)
        now = time.time()
        await self.db.execute(
            "INSERT INTO outbox (job_id, to_addr, subject, body, next_attempt_at, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (job_id, job["email"], subject, body, now, now),
        )
        self._wake.set()

    async def queue_missed(self) -> None:
        """Queue the emails of jobs that finished, asked for one, and have none: a job is
        marked finished before its email is queued, so a server killed in between would
        otherwise never send it."""
        for row in await self.db.fetchall(
            "SELECT j.id FROM jobs j JOIN job_requests r ON r.id = j.job_request_id "
            "WHERE j.completed_at > ? AND r.notify = 1 "
            "AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = j.id)",
            (time.time() - MISSED_WITHIN,),
        ):
            await self.job_finished(row["id"])

    # -- sending ---------------------------------------------------------------------

    async def _send_loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                delay = await self.send_due()
            except Exception:
                log.exception("sending the outbox failed")
                delay = self.retry_delay
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass

    async def send_due(self) -> float | None:
        """Send every email that is due; returns seconds until the next one is, if any."""
        now = time.time()
        due = await self.db.fetchall(
            "SELECT * FROM outbox WHERE sent_at IS NULL AND attempts < ? "
            "AND next_attempt_at <= ? ORDER BY id",
            (MAX_ATTEMPTS, now),
        )
        for row in due:
            if self._stopping:
                return None
            await self._send_one(row)
        next_at = await self.db.fetchval(
            "SELECT min(next_attempt_at) FROM outbox WHERE sent_at IS NULL AND attempts < ?",
            (MAX_ATTEMPTS,),
        )
        return None if next_at is None else max(0.0, next_at - time.time())

    async def _send_one(self, row: Row) -> None:
        smtp = self.settings.smtp
        try:
            await aiosmtplib.send(
                self._message(row),
                hostname=smtp.host,
                port=smtp.port,
                username=smtp.username,
                password=smtp.password,
                use_tls=smtp.tls,
                start_tls=smtp.starttls and not smtp.tls,
                timeout=smtp.timeout,
            )
        except Exception as e:
            attempts = row["attempts"] + 1
            error = f"{type(e).__name__}: {e}"
            delay = min(self.retry_delay * 2 ** (attempts - 1), MAX_RETRY_DELAY)
            await self.db.execute(
                "UPDATE outbox SET attempts = ?, last_error = ?, next_attempt_at = ? WHERE id = ?",
                (attempts, error, time.time() + delay, row["id"]),
            )
            if attempts >= MAX_ATTEMPTS:
                log.error(
                    "gave up sending email %s to %s after %s attempts: %s",
                    row["id"],
                    row["to_addr"],
                    attempts,
                    error,
                )
            else:
                log.warning(
                    "could not send email %s to %s via %s:%s (attempt %s, next in %.0fs): %s",
                    row["id"],
                    row["to_addr"],
                    smtp.host,
                    smtp.port,
                    attempts,
                    delay,
                    error,
                )
            return
        await self.db.execute(
            "UPDATE outbox SET attempts = attempts + 1, sent_at = ?, last_error = NULL "
            "WHERE id = ?",
            (time.time(), row["id"]),
        )
        log.info("sent email %s to %s: %s", row["id"], row["to_addr"], row["subject"])

    def _message(self, row: Row) -> EmailMessage:
        message = EmailMessage()
        message["From"] = self.settings.smtp.from_addr
        message["To"] = row["to_addr"]
        message["Subject"] = row["subject"]
        message["Date"] = email.utils.formatdate(row["created_at"], usegmt=True)
        domain = urlsplit(self.settings.base_url).hostname or "localhost"
        message["Message-ID"] = email.utils.make_msgid("jobsite", domain=domain)
        message.set_content(row["body"])
        return message


async def outbox_json(db: Database, settings: Settings, limit: int = 100) -> dict[str, Any]:
    """The newest emails of the outbox, as admins see them."""
    rows = await db.fetchall("SELECT * FROM outbox ORDER BY id DESC LIMIT ?", (limit,))
    return {
        "smtp_configured": settings.smtp.enabled,
        "emails": [
            {
                "id": row["id"],
                "job_id": row["job_id"],
                "to": row["to_addr"],
                "subject": row["subject"],
                "body": row["body"],
                "status": _outbox_status(row, settings),
                "attempts": row["attempts"],
                "last_error": row["last_error"],
                "next_attempt_at": None if row["sent_at"] else iso_ms(row["next_attempt_at"]),
                "sent_at": iso_ms(row["sent_at"]),
                "created_at": iso_ms(row["created_at"]),
            }
            for row in rows
        ],
    }


def _outbox_status(row: Row, settings: Settings) -> str:
    if row["sent_at"] is not None:
        return "sent"
    if row["attempts"] >= MAX_ATTEMPTS:
        return "gave_up"
    if not settings.smtp.enabled:
        return "not_sent_smtp_not_configured"
    return "waiting"
