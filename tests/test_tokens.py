"""Resume tokens: bearer secrets stored only as SHA-256, rotated, refused alike."""

from __future__ import annotations

import asyncio
import hashlib
import random
import string
from pathlib import Path

import pytest

from sessionstore import SessionManager
from tests.conftest import ManagerFactory
from tests.helpers import ManualClock


@pytest.mark.contract
async def test_token_resumes_its_session_and_rotation_revokes_the_old_one(
    manager: SessionManager,
) -> None:
    session = await manager.ensure(data={"k": 1})
    first = await manager.issue_token(session.session_id)
    assert len(first) >= 43  # 32 bytes from secrets, base64url: 256 bits
    resumed = await manager.resume(first)
    assert resumed.reason is None
    assert resumed.session is not None
    assert (resumed.session.session_id, resumed.session.data) == (session.session_id, {"k": 1})
    second = await manager.issue_token(session.session_id)
    assert second != first
    assert (await manager.resume(first)).reason == "revoked"
    assert (await manager.resume(second)).session is not None


@pytest.mark.contract
async def test_failed_resumes_say_why(manager: SessionManager, clock: ManualClock) -> None:
    removed = await manager.ensure()
    removed_token = await manager.issue_token(removed.session_id)
    idle = await manager.ensure()
    idle_token = await manager.issue_token(idle.session_id)
    await manager.remove(removed.session_id)
    assert (await manager.resume(removed_token)).reason == "revoked"
    clock.advance(62)  # past the timeout and cleanup's grace (a flush interval)
    assert (await manager.resume(idle_token)).reason == "expired"  # row still there
    assert await manager.cleanup_stale_sessions() == 1
    assert (await manager.resume(idle_token)).reason == "expired"  # tombstone remembers
    assert (await manager.resume("never-issued")).reason == "unknown"


@pytest.mark.contract
async def test_tombstones_are_forgotten_after_their_retention(
    make_manager: ManagerFactory, clock: ManualClock
) -> None:
    async with make_manager(tombstone_retention_secs=100) as m:
        s = await m.ensure()
        token = await m.issue_token(s.session_id)
        await m.remove(s.session_id)
        clock.advance(101)
        await m.cleanup_stale_sessions()
        assert (await m.resume(token)).reason == "unknown"


def _hostile_tokens(n: int) -> list[str]:
    rng = random.Random(1234)
    fixed = [
        "",
        " ",
        "\x00",
        "a\x00b",
        "'",
        '"',
        "' OR 1=1 --",
        "'; DROP TABLE sessions; --",
        "x" * 10_240,
        "\ud800",
        "é" * 100,
        "%s",
        "{}",
        "null",
        "../../etc/passwd",
    ]
    alphabet = string.ascii_letters + string.digits + "-_"
    tokens = list(fixed)
    while len(tokens) < n:
        kind = rng.randrange(3)
        if kind == 0:  # well-formed: the same shape as a real token
            tokens.append("".join(rng.choice(alphabet) for _ in range(43)))
        elif kind == 1:
            tokens.append("".join(chr(rng.randrange(1, 0x2FF)) for _ in range(rng.randrange(80))))
        else:
            tokens.append(rng.randbytes(rng.randrange(64)).decode("latin-1"))
    return tokens


async def test_ten_thousand_guesses_are_all_refused_alike(
    manager: SessionManager, db_path: Path
) -> None:
    session = await manager.ensure()
    real = await manager.issue_token(session.session_id)
    reasons = set()
    for guess in _hostile_tokens(10_000):
        result = await manager.resume(guess)
        assert result.session is None, guess
        reasons.add(result.reason)
    assert reasons == {"unknown"}
    assert (await manager.resume(real)).session is not None
    assert await manager.list_ids() == [session.session_id]  # nothing written, nothing lost


async def test_raw_token_is_never_stored(manager: SessionManager, db_path: Path) -> None:
    tokens = []
    for _ in range(5):
        s = await manager.ensure()
        tokens.append(await manager.issue_token(s.session_id))
        tokens.append(await manager.issue_token(s.session_id))  # the first goes to a tombstone
    await manager.list_ids()
    blobs = b"".join(p.read_bytes() for p in db_path.parent.glob(db_path.name + "*"))
    for token in tokens:
        assert token.encode() not in blobs
    assert hashlib.sha256(tokens[-1].encode()).hexdigest().encode() in blobs


@pytest.mark.contract
async def test_lookups_by_many_keys_find_exactly_the_rows_that_exist(
    manager: SessionManager,
) -> None:
    """The ``IN`` reads behind cache misses and resumes: lists longer than one
    statement holds (rows on both sides of each boundary), lists of every length (each
    padded to a power of two with its last key), keys given twice, keys that match
    nothing; and a failing read is a StorageError on either backend."""
    from sqlalchemy import text

    from sessionstore import StorageError
    from sessionstore.manager import hash_token

    ids = [(await manager.ensure(data={"i": i})).session_id for i in range(6)]
    tokens = {sid: await manager.issue_token(sid) for sid in ids[:4]}
    await manager.remove(ids[3])  # its token is now a tombstone's: "revoked"
    store = manager.store
    unknown = [f"nobody-{i}" for i in range(1100)]
    # 512 keys a statement: ids at 0, 511 | 512, 1023 | 1024 and the last.
    keys = [ids[0], *unknown[:510], ids[1], ids[2], *unknown[510:1020], ids[0], ids[4]]
    keys += [*unknown[1020:], ids[5], ids[3]]
    assert (keys.index(ids[1]), keys.index(ids[2]), keys.index(ids[4])) == (511, 512, 1024)
    rows = await store.fetch_many(keys)
    assert {r.session_id for r in rows} == {ids[0], ids[1], ids[2], ids[4], ids[5]}
    assert len(rows) == 6  # ids[0] is in two statements
    for n in range(1, 10):  # padded lengths 1, 2, 4, 4, 8, ... 16
        some = ids[:n] if n <= len(ids) else [*ids, *unknown[: n - len(ids)]]
        got = [r.session_id for r in await store.fetch_many(some)]
        assert sorted(got) == sorted(sid for sid in set(some) if sid in ids and sid != ids[3])
    assert await store.fetch_many([]) == []
    heads = await store.fetch_heads(keys)
    assert len(heads) == 6
    assert {tuple(h) for h in heads} == {
        (r.session_id, r.created_at, r.last_activity, r.version) for r in rows
    }
    assert await store.fetch_heads([]) == []
    digests = [hash_token(t) for t in tokens.values()]
    found = await store.resume_lookup([*(f"{i:064x}" for i in range(700)), *digests, digests[0]])
    assert set(found) == set(digests)
    for sid, digest in zip(ids[:3], digests[:3], strict=True):
        row, reason = found[digest]
        assert row is not None
        assert (row.session_id, reason) == (sid, None)
    assert found[digests[3]] == (None, "revoked")
    assert await store.resume_lookup([]) == {}

    cascade = " CASCADE" if store.dialect == "postgresql" else ""
    async with store.engine.begin() as conn:
        await conn.execute(text(f"DROP TABLE session_tombstones{cascade}"))
        await conn.execute(text("DROP VIEW IF EXISTS sessions_readable"))
        await conn.execute(text(f"DROP TABLE sessions{cascade}"))
    with pytest.raises(StorageError):
        await store.fetch_many(ids)
    with pytest.raises(StorageError):
        await store.fetch_heads(ids)
    with pytest.raises(StorageError):
        await store.resume_lookup(digests)


async def test_a_token_is_replaced_once(manager: SessionManager) -> None:
    await manager.ensure("s")
    token = await manager.issue_token("s")
    results = await asyncio.gather(
        manager.issue_token("s", replacing=token),
        manager.issue_token("s", replacing=token),
        return_exceptions=True,
    )
    assert sorted(type(r).__name__ for r in results) == ["SessionNotFoundError", "str"]
    new = next(r for r in results if isinstance(r, str))
    assert (await manager.resume(new)).session is not None
    assert (await manager.resume(token)).reason == "revoked"


async def test_removing_an_expired_session_says_false_and_its_token_says_expired(
    manager: SessionManager, clock: ManualClock
) -> None:
    # Found by review: remove() of a session get() already called absent said True,
    # listeners heard "removed", and its token then said "revoked".
    await manager.ensure("idle")
    token = await manager.issue_token("idle")
    clock.advance(62)  # past the timeout and the flush interval's grace
    assert await manager.get("idle") is None
    heard: list[tuple[str, str]] = []
    manager.add_removal_listener(lambda sid, why: heard.append((sid, why)))
    assert await manager.remove("idle") is False
    assert heard == [("idle", "expired")]
    assert (await manager.resume(token)).reason == "expired"
    assert await manager.store.fetch("idle") is None  # the row is gone all the same


async def test_a_session_created_in_place_of_an_expired_one_leaves_its_token_expired(
    manager: SessionManager, clock: ManualClock
) -> None:
    # Found by review: ensure(id) deleted the expired row without a tombstone, so its
    # token said "unknown", and no listener heard of it.
    await manager.ensure("x", data={"n": 1})
    token = await manager.issue_token("x")
    clock.advance(61)
    heard: list[tuple[str, str]] = []
    manager.add_removal_listener(lambda sid, why: heard.append((sid, why)))
    assert (await manager.ensure("x", data={"n": 2})).data == {"n": 2}
    assert heard == [("x", "expired")]
    assert (await manager.resume(token)).reason == "expired"
    assert (await manager.get("x")).data == {"n": 2}  # type: ignore[union-attr]
