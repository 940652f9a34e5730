"""auth.py on its own: passwords, API tokens, the rate limiter, sealed secrets."""

from __future__ import annotations

import hashlib

import pytest

from jobsite import auth
from jobsite.db import Database


@pytest.fixture
async def db(tmp_path):
    database = await Database.open(tmp_path / "db.sqlite")
    yield database
    await database.close()


def test_a_password_verifies_only_itself():
    stored = auth.hash_password("correct horse")
    assert stored.startswith("scrypt$16384$8$1$")
    assert auth.verify_password("correct horse", stored)
    assert not auth.verify_password("correct hors", stored)
    assert stored != auth.hash_password("correct horse"), "each hash has its own salt"


@pytest.mark.parametrize("stored", [None, "", "plain", "bcrypt$1$2$3$4$5"])
def test_a_missing_or_foreign_hash_never_verifies(stored):
    assert not auth.verify_password("anything", stored)


@pytest.mark.parametrize(
    ("password", "problem"),
    [
        ("short", "at least 10 characters"),
        ("Alice-1234", "must not be the username"),
        ("a fine long password", None),
    ],
)
def test_new_passwords_are_checked(password, problem):
    found = auth.password_problem(password, "alice-1234")
    assert (found is None) if problem is None else (problem in found)


async def test_api_tokens_are_stored_only_as_hashes(db):
    user_id = await auth.create_user(db, "alice", "a long password")
    token = await auth.create_token(db, user_id, "laptop")
    assert token.startswith("jst_")
    rows = await db.fetchall("SELECT * FROM api_tokens")
    assert len(rows) == 1
    assert rows[0]["token_hash"] == hashlib.sha256(token.encode()).hexdigest()
    assert token not in str(rows)
    user = await auth.authenticate_token(db, token)
    assert user is not None and user.username == "alice"
    assert await db.fetchval("SELECT last_used_at FROM api_tokens") is not None


async def test_a_revoked_token_no_longer_authenticates(db):
    alice = await auth.create_user(db, "alice")
    bob = await auth.create_user(db, "bob")
    token = await auth.create_token(db, alice, "laptop")
    token_id = await db.fetchval("SELECT id FROM api_tokens")
    assert not await auth.revoke_token(db, bob, token_id), "bob cannot revoke alice's token"
    assert await auth.authenticate_token(db, token) is not None
    assert await auth.revoke_token(db, alice, token_id)
    assert await auth.authenticate_token(db, token) is None


async def test_a_deactivated_user_is_nobody(db):
    user_id = await auth.create_user(db, "alice", "a long password")
    token = await auth.create_token(db, user_id, "laptop")
    await db.execute("UPDATE users SET is_active = 0 WHERE id = ?", (user_id,))
    assert await auth.authenticate_password(db, "alice", "a long password") is None
    assert await auth.authenticate_token(db, token) is None


async def test_password_sign_in_ignores_the_usernames_case(db):
    await auth.create_user(db, "Alice", "a long password")
    user = await auth.authenticate_password(db, "alice", "a long password")
    assert user is not None and user.username == "Alice"
    assert await auth.authenticate_password(db, "nobody", "a long password") is None


def test_the_rate_limiter_refuses_past_its_limit_until_the_window_passes(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(auth.time, "monotonic", lambda: now[0])
    limiter = auth.RateLimiter(limit=3, window=60)
    assert [limiter.allow("a") for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b"), "each key has its own count"
    now[0] += 61
    assert limiter.allow("a")
    limiter.allow("a")
    limiter.allow("a")
    assert not limiter.allow("a")
    limiter.reset("a")
    assert limiter.allow("a")


def test_a_sealed_secret_opens_only_with_the_same_key():
    sealer = auth.Sealer("key one")
    sealed = sealer.seal("gho_secret")
    assert "gho_secret" not in sealed
    assert sealer.unseal(sealed) == "gho_secret"
    assert auth.Sealer("key two").unseal(sealed) is None
    assert sealer.unseal(sealed[:-4] + "AAAA") is None
    assert sealer.unseal("not sealed at all") is None


def test_the_github_authorize_url_asks_for_email_and_carries_the_state():
    github = auth.GitHub(
        auth.config.GitHub(client_id="cid", client_secret="s", base_url="https://ghe.example.org/")
    )
    url = github.authorize_url("https://jobs.example.org/auth/github/callback", "st4te")
    assert url.startswith("https://ghe.example.org/login/oauth/authorize?")
    assert "client_id=cid" in url
    assert "scope=user%3Aemail" in url
    assert "state=st4te" in url
    assert "redirect_uri=https%3A%2F%2Fjobs.example.org%2Fauth%2Fgithub%2Fcallback" in url


def test_the_rate_limiter_forgets_keys_whose_window_passed(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(auth.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(auth.RateLimiter, "PRUNE_AT", 100)
    limiter = auth.RateLimiter(limit=3, window=60)
    for n in range(100):
        limiter.allow(f"user:{n}")
    limiter.allow("user:recent")
    now[0] += 30
    limiter.allow("user:recent")
    now[0] += 31
    limiter.allow("user:new")
    assert set(limiter.hits) == {"user:recent", "user:new"}


async def test_a_tokens_last_use_is_kept_to_the_minute(db):
    user_id = await auth.create_user(db, "alice")
    token = await auth.create_token(db, user_id, "laptop")
    now = auth.time.time()
    await db.execute("UPDATE api_tokens SET last_used_at = ?", (now - 30,))
    await auth.authenticate_token(db, token)
    assert await db.fetchval("SELECT last_used_at FROM api_tokens") == now - 30
    await db.execute("UPDATE api_tokens SET last_used_at = ?", (now - 90,))
    await auth.authenticate_token(db, token)
    assert await db.fetchval("SELECT last_used_at FROM api_tokens") >= now
