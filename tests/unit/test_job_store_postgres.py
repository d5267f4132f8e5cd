"""The PostgreSQL job store against a real PostgreSQL (a throw-away cluster, tests/pg_cluster.py): claims
that never collide (SKIP LOCKED), leases that expire into one re-queue and then a failure, guarded writes
of a replica that lost its job, and the shared-output-directory rule."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from diffserve.runtime.api import GenerationRequest
from diffserve.server.config import ServerConfig
from tests.pg_cluster import cluster_fixture

_names = itertools.count()


@pytest.fixture(scope="module")
def cluster():
    yield from cluster_fixture()


@pytest.fixture
def url(cluster):
    return cluster.create_database(f"store_{next(_names)}")


def run(coro):
    return asyncio.run(coro)


async def open_store(url, lease=30.0):
    from diffserve.server.jobs_postgres import PostgresJobStore

    return await PostgresJobStore.open(url, lease)


async def add_jobs(store, n, model="wan"):
    ids = []
    for i in range(n):
        job_id = f"video_{i:032x}"
        await store.create(
            {"prompt": f"p{i}"}, id=job_id, model=model, prompt=f"p{i}", seconds="1", size="32x32"
        )
        ids.append(job_id)
    return ids


def test_concurrent_replicas_claim_each_job_once_oldest_first(url):
    async def scenario():
        stores = [await open_store(url) for _ in range(4)]
        ids = await add_jobs(stores[0], 24)

        async def replica(k):
            got = []
            while (claimed := await stores[k].claim(f"r{k}", "wan")) is not None:
                got.append(claimed[0])
            return got

        claims = await asyncio.gather(*(replica(k) for k in range(4)))
        rows = [await stores[0].get(i) for i in ids]
        for s in stores:
            await s.close()
        return ids, claims, rows

    ids, claims, rows = run(scenario())
    flat = [i for got in claims for i in got]
    assert sorted(flat) == ids  # every job once, none twice
    for got in claims:
        assert got == sorted(got)  # each replica takes the oldest queued one
    assert sum(1 for got in claims if got) >= 2  # the claims interleaved between replicas
    by_replica = {i: f"r{k}" for k, got in enumerate(claims) for i in got}
    assert all(r["status"] == "in_progress" and r["replica"] == by_replica[r["id"]] for r in rows)


def test_a_row_locked_by_another_claim_is_skipped_not_waited_for(url):
    import psycopg

    async def scenario():
        store = await open_store(url)
        first, second = await add_jobs(store, 2)
        async with await psycopg.AsyncConnection.connect(url) as other:
            # another replica in the middle of claiming the oldest job
            await other.execute("SELECT id FROM diffserve_videos WHERE id = %s FOR UPDATE", (first,))
            t0 = time.monotonic()
            claimed = await asyncio.wait_for(store.claim("b", "wan"), 5)
            took = time.monotonic() - t0
            await other.rollback()
        await store.close()
        return second, claimed, took

    second, claimed, took = run(scenario())
    assert claimed[0] == second and claimed[1] == {"prompt": "p1"} and took < 2


def test_a_replica_claims_only_its_own_model(url):
    async def scenario():
        store = await open_store(url)
        (flux,) = await add_jobs(store, 1, model="flux")
        none = await store.claim("a", "wan")
        mine = await store.claim("b", "flux")
        await store.close()
        return flux, none, mine

    flux, none, mine = run(scenario())
    assert none is None and mine[0] == flux


def test_expired_lease_requeues_once_then_fails_and_the_loser_cannot_write(url):
    async def scenario():
        store = await open_store(url, lease=0.3)
        (job,) = await add_jobs(store, 1)
        assert (await store.claim("a", "wan"))[0] == job
        assert await store.progress(job, "a", 40)
        assert await store.reap(2, 3600) == []  # the lease still holds
        await asyncio.sleep(0.5)  # a stops renewing (it died)
        assert await store.reap(2, 3600) == [(job, "queued", "a")]
        requeued = await store.get(job)
        assert (await store.claim("b", "wan"))[0] == job
        # a comes back from a pause: it no longer holds the job and cannot write over b's run
        assert await store.renew("a", [job]) == set()
        assert not await store.progress(job, "a", 90)
        assert not await store.finish(job, "a", "completed")
        assert await store.renew("b", [job]) == {job}
        await asyncio.sleep(0.5)  # b dies too
        reaped = await store.reap(2, 3600)
        failed = await store.get(job)
        await store.close()
        return requeued, reaped, failed

    requeued, reaped, failed = run(scenario())
    assert requeued["status"] == "queued" and requeued["replica"] is None and requeued["progress"] == 0
    assert reaped == [(failed["id"], "failed", "b")]
    assert failed["status"] == "failed" and failed["error_code"] == "replica_lost"
    assert "(b) stopped renewing its lease, 2 times" in failed["error_message"]
    assert failed["completed_at"] is not None


def test_cancel_through_any_replica_and_release_on_shutdown(url):
    async def scenario():
        store = await open_store(url)
        running, queued, released = await add_jobs(store, 3)
        await store.claim("a", "wan")
        cancelled = await store.cancel(running)
        held = await store.renew("a", [running])  # a sees the cancel at its next renewal
        wrote = await store.finish(running, "a", "failed", "cancelled", "x")
        queued_cancel = await store.cancel(queued)
        assert (await store.claim("a", "wan"))[0] == released  # the cancelled queued job is not claimed
        assert await store.release(released, "a")
        back = await store.get(released)
        done = await store.get(running)
        await store.close()
        return cancelled, held, wrote, queued_cancel, back, done

    cancelled, held, wrote, queued_cancel, back, done = run(scenario())
    assert cancelled["status"] == "cancelled" and held == set() and not wrote
    assert done["error_code"] == "cancelled"
    assert queued_cancel["status"] == "cancelled"
    assert back["status"] == "queued" and back["replica"] is None


def test_a_job_nobody_starts_fails_after_the_video_timeout(url):
    async def scenario():
        store = await open_store(url)
        (job,) = await add_jobs(store, 1, model="nobody-serves-this")
        await asyncio.sleep(1.1)  # created_at has whole seconds
        reaped = await store.reap(2, 0.5)
        row = await store.get(job)
        await store.close()
        return job, reaped, row

    job, reaped, row = run(scenario())
    assert reaped == [(job, "failed", None)]
    assert (
        row["error_code"] == "timeout" and "no replica started this job within 0.5 s" in row["error_message"]
    )


def test_output_dir_must_be_the_shared_one(url, tmp_path):
    from diffserve.server.jobs_postgres import MARKER, JobStoreError

    shared, local, other = tmp_path / "shared", tmp_path / "local", tmp_path / "other"
    for d in (shared, local, other):
        d.mkdir()
    (other / MARKER).write_text("0" * 32)

    async def scenario():
        store = await open_store(url)
        await store.check_output_dir(shared)  # the first replica: its directory becomes the shared one
        await store.check_output_dir(shared)  # a second replica mounting the same volume
        errors = []
        for d in (local, other):
            with pytest.raises(JobStoreError) as e:
                await store.check_output_dir(d)
            errors.append(str(e.value))
        await store.close()
        return errors

    no_marker, foreign = run(scenario())
    assert (shared / MARKER).is_file()
    assert f"{local} has no {MARKER}" in no_marker and "ReadWriteMany" in no_marker
    assert "another job store's" in foreign


def test_unreachable_store_is_one_clear_error(cluster):
    from diffserve.server.jobs_postgres import JobStoreError

    bad = f"postgresql://diffserve:secret@127.0.0.1:{cluster.port}/no_such_database"
    with pytest.raises(JobStoreError) as e:
        run(open_store(bad))
    message = str(e.value)
    assert "cannot connect to the job store" in message and "no_such_database" in message
    assert "secret" not in message  # the password stays out of logs


def test_request_round_trip_and_config():
    from diffserve.server.jobs_shared import decode_request, encode_request

    request = GenerationRequest(
        prompt="a", width=32, height=32, num_frames=5, seed=3, image=b"\x89PNG\x00\xff", extra={"k": 0.5}
    )
    assert decode_request(encode_request(request)) == request
    assert decode_request({**encode_request(request), "from_a_newer_replica": 1}) == request
    with pytest.raises(ValueError, match="postgresql://"):
        ServerConfig(job_store="mysql://x")
    assert ServerConfig(job_store="").job_store is None
    with pytest.raises(ValueError, match="job_lease"):
        ServerConfig(job_lease=0)


def test_an_unreachable_store_answers_503_not_500(url, tmp_path):
    from diffserve.server.errors import APIError
    from diffserve.server.files import OutputFiles
    from diffserve.server.jobs_shared import SharedVideoJobs

    async def scenario():
        store = await open_store(url)
        jobs = SharedVideoJobs(store, OutputFiles(tmp_path), engine=None, cfg=ServerConfig(job_store=url))
        await store.close()  # as good as a database that went away
        with pytest.raises(APIError) as e:
            await jobs.get("video_" + "0" * 32)
        return e.value

    error = run(scenario())
    assert error.status == 503 and error.code == "job_store_unavailable"
    assert error.headers["Retry-After"] == "5"
