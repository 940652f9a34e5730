"""The order of the queue, as pure code: a simulation with a virtual clock and slots.

``Simulation`` plays the scheduler's part: jobs of given durations arrive, and whenever a
slot frees or work arrives it asks the ``JobQueue`` for the next job, exactly as
runner.Scheduler does, but without Docker, a database or real time.
"""

from __future__ import annotations

import heapq
import itertools
import random
import statistics
from collections import defaultdict
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobsite.runner import jobs_ahead
from jobsite.scheduling import (
    DEFAULT_RUNTIME,
    HALF_LIFE,
    JobQueue,
    Limits,
    QueuedJob,
    Running,
    Waiting,
    decayed,
    expected_runtime,
    expected_starts,
    median,
    queue_order,
)


@dataclass
class Simulation:
    limits: Limits
    queue: JobQueue = field(default_factory=JobQueue)
    now: float = 0.0
    durations: dict[str, float] = field(default_factory=dict)
    fails: set[str] = field(default_factory=set)
    started: dict[str, float] = field(default_factory=dict)
    finished: dict[str, float] = field(default_factory=dict)
    dependency_failed: dict[str, str] = field(default_factory=dict)  # job -> its dependency
    users: dict[str, int] = field(default_factory=dict)
    events: list = field(default_factory=list)
    seq: itertools.count = field(default_factory=itertools.count)

    def submit(
        self,
        at: float,
        job_id: str,
        user: int,
        duration: float,
        *,
        priority: int = 0,
        needs: tuple[str, ...] = (),
        requires_db: bool = False,
        fails: bool = False,
    ) -> None:
        job = QueuedJob(job_id, user, priority=priority, created_at=at, requires_db=requires_db)
        job.waiting_on = set(needs)
        self.durations[job_id] = duration
        self.users[job_id] = user
        if fails:
            self.fails.add(job_id)
        # arrivals sort after finishes at the same moment (kind 1 > 0)
        heapq.heappush(self.events, (at, 1, next(self.seq), job))

    def run(self, until: float = float("inf")) -> None:
        while self.events and self.events[0][0] <= until:
            self.now = self.events[0][0]
            while self.events and self.events[0][0] == self.now:
                _, kind, _, payload = heapq.heappop(self.events)
                if kind == 0:
                    ok = payload not in self.fails
                    self.finished[payload] = self.now
                    for failure in self.queue.finish(payload, self.now, succeeded=ok):
                        self.dependency_failed[failure.job.id] = failure.dependency.id
                else:
                    payload.waiting_on = {d for d in payload.waiting_on if self.queue.get(d)}
                    self.queue.add(payload)
            self.dispatch()
            self.check_no_idle_slot()
        self.now = max(self.now, until) if until != float("inf") else self.now

    def dispatch(self) -> None:
        while (job := self.queue.pick(self.now, self.limits)) is not None:
            self.queue.start(job.id, self.now)
            self.started[job.id] = self.now
            end = self.now + self.durations[job.id]
            heapq.heappush(self.events, (end, 0, next(self.seq), job.id))

    def check_no_idle_slot(self) -> None:
        """No slot stays idle while a job that the caps allow could run on it."""
        if len(self.queue.running) >= self.limits.max_workers:
            return
        for job in self.queue.runnable():
            cap = self.limits.max_jobs_per_user
            db_cap = self.limits.max_db_workers
            user_full = cap is not None and self.queue.running_count(job.user_id) >= cap
            db_full = (
                job.requires_db
                and db_cap is not None
                and sum(j.requires_db for j in self.queue.running.values()) >= db_cap
            )
            assert user_full or db_full, f"slot idle at {self.now} while {job.id} could run"

    def slot_time(self, until: float) -> dict[int, float]:
        """Slot-seconds each user held in [0, until]."""
        used: dict[int, float] = defaultdict(float)
        for job_id, start in self.started.items():
            end = min(self.finished.get(job_id, until), until)
            used[self.users[job_id]] += max(0.0, end - start)
        return used


def jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


def test_a_light_users_job_starts_at_the_next_free_slot_despite_a_heavy_backlog():
    sim = Simulation(Limits(max_workers=4))
    rng = random.Random(1)
    for i in range(1000):
        sim.submit(0.0, f"heavy-{i}", user=1, duration=rng.uniform(5, 15))
    sim.run(until=7.0)
    assert len(sim.queue.running) == 4
    next_free = min(sim.started[j] + sim.durations[j] for j in sim.queue.running)
    assert next_free > 7.0

    sim.submit(7.0, "light", user=2, duration=1.0)
    sim.run(until=next_free)

    assert sim.started["light"] == next_free
    assert sum(1 for j in sim.started if j.startswith("heavy")) < 10


def test_busy_users_share_slot_time_fairly():
    # four users, each always with work queued, with very different job lengths; five slots
    sim = Simulation(Limits(max_workers=5))
    horizon = 4 * 3600.0
    for user, duration in [(1, 1.0), (2, 7.0), (3, 45.0), (4, 300.0)]:
        for i in range(int(horizon * 5 / duration) + 1):
            sim.submit(0.0, f"u{user}-{i}", user=user, duration=duration)
    sim.run(until=horizon)

    used = sim.slot_time(horizon)
    assert sum(used.values()) == pytest.approx(5 * horizon)  # no slot ever idle
    assert jain(list(used.values())) >= 0.95, used


def test_users_arriving_later_catch_up_to_a_fair_share():
    sim = Simulation(Limits(max_workers=3))
    for user, arrives in [(1, 0.0), (2, 600.0), (3, 1200.0)]:
        for i in range(2000):
            sim.submit(arrives, f"u{user}-{i}", user=user, duration=10.0)
    sim.run(until=1200.0)
    before = sim.slot_time(1200.0)
    sim.run(until=3 * 3600.0)
    used = sim.slot_time(3 * 3600.0)
    since_all_arrived = [used[u] - before.get(u, 0.0) for u in (1, 2, 3)]
    assert jain(since_all_arrived) >= 0.95, since_all_arrived


def test_a_higher_priority_request_of_the_same_user_goes_first():
    sim = Simulation(Limits(max_workers=1))
    sim.submit(0.0, "running", user=1, duration=10)
    sim.submit(1.0, "old-normal", user=1, duration=10)
    sim.submit(2.0, "new-urgent", user=1, duration=10, priority=5)
    sim.run()
    assert sim.started["new-urgent"] == 10.0
    assert sim.started["old-normal"] == 20.0


def test_priority_decides_between_users_otherwise_equal():
    sim = Simulation(Limits(max_workers=1))
    sim.submit(0.0, "a", user=1, duration=10)
    sim.submit(0.0, "b", user=2, duration=10, priority=1)
    sim.run()
    assert sim.started == {"b": 0.0, "a": 10.0}


def test_an_admin_can_raise_a_waiting_requests_priority():
    queue = JobQueue()
    for i, request in enumerate([10, 11, 12]):
        queue.add(QueuedJob(f"j{i}", user_id=1, request_id=request, created_at=float(i)))
    limits = Limits(max_workers=1)
    assert queue.pick(0.0, limits).id == "j0"

    changed = queue.set_priority(12, 3)
    assert [job.id for job in changed] == ["j2"]
    assert queue.pick(0.0, limits).id == "j2"
    assert [job.id for job in queue.order(0.0)] == ["j2", "j0", "j1"]

    queue.set_priority(12, -1)
    assert [job.id for job in queue.order(0.0)] == ["j0", "j1", "j2"]
    assert queue.pick(0.0, limits).id == "j0"


def test_nothing_starves_in_a_long_mixed_workload():
    rng = random.Random(7)
    sim = Simulation(Limits(max_workers=4))
    submitted = []
    for user in range(1, 9):
        heavy = user <= 2
        t = 0.0
        for i in range(400 if heavy else 30):
            t += rng.expovariate(1 / (2.0 if heavy else 60.0))
            job_id = f"u{user}-{i}"
            sim.submit(t, job_id, user=user, duration=rng.uniform(1, 20))
            submitted.append((job_id, t, heavy))
    sim.run()
    assert set(sim.started) == {job_id for job_id, _, _ in submitted}
    light_waits = [sim.started[j] - t for j, t, heavy in submitted if not heavy]
    heavy_waits = [sim.started[j] - t for j, t, heavy in submitted if heavy]
    # the two heavy users ask for more than the four slots give, yet a light user's job
    # waits at most about two job lengths (20 s at most each), a few seconds on average
    assert max(light_waits) <= 40.0, max(light_waits)
    assert statistics.mean(light_waits) <= 5.0
    assert statistics.mean(heavy_waits) > 100 * statistics.mean(light_waits)


def test_a_dependent_starts_the_moment_its_dependency_succeeds():
    sim = Simulation(Limits(max_workers=2))
    sim.submit(0.0, "generate", user=1, duration=5)
    sim.submit(0.0, "analyse", user=1, duration=5, needs=("generate",))
    sim.submit(0.0, "report", user=1, duration=5, needs=("analyse", "generate"))
    sim.run()
    assert sim.started == {"generate": 0.0, "analyse": 5.0, "report": 10.0}


def test_a_failed_dependency_fails_its_dependents_transitively():
    sim = Simulation(Limits(max_workers=2))
    sim.submit(0.0, "generate", user=1, duration=5, fails=True)
    sim.submit(0.0, "analyse", user=1, duration=5, needs=("generate",))
    sim.submit(0.0, "report", user=1, duration=5, needs=("analyse",))
    sim.submit(0.0, "other", user=1, duration=5)
    sim.run()
    assert sim.dependency_failed == {"analyse": "generate", "report": "analyse"}
    assert set(sim.started) == {"generate", "other"}
    assert not sim.queue.pending


def test_cancelling_a_pending_job_fails_what_needs_it():
    queue = JobQueue()
    queue.add(QueuedJob("a", 1))
    queue.add(QueuedJob("b", 1, waiting_on={"a"}))
    queue.add(QueuedJob("c", 1, waiting_on={"b", "a"}))
    queue.add(QueuedJob("d", 1))

    job, failures = queue.remove("a")

    assert job.id == "a"
    assert [(f.job.id, f.dependency.id) for f in failures] == [("b", "a"), ("c", "a")]
    assert list(queue.pending) == ["d"]
    assert queue.pick(0.0, Limits(1)).id == "d"


def test_per_user_and_database_caps_leave_slots_to_others():
    sim = Simulation(Limits(max_workers=4, max_jobs_per_user=2, max_db_workers=1))
    for i in range(5):
        sim.submit(0.0, f"heavy-{i}", user=1, duration=10)
    for i in range(3):
        sim.submit(0.0, f"db-{i}", user=2, duration=10, requires_db=True)
    sim.submit(0.0, "plain", user=2, duration=10)
    sim.run(until=0.0)
    running = set(sim.queue.running)
    assert running == {"heavy-0", "heavy-1", "db-0", "plain"}
    sim.run()
    assert len(sim.started) == 9


def test_a_user_with_fewer_running_jobs_goes_before_one_with_less_usage():
    queue = JobQueue()
    queue.set_usage(1, 10_000.0, 0.0)
    queue.add(QueuedJob("busy-running", 2))
    queue.start("busy-running", 0.0)
    queue.add(QueuedJob("busy-next", 2))
    queue.add(QueuedJob("used-a-lot", 1))
    assert queue.pick(0.0, Limits(4)).id == "used-a-lot"


def test_usage_halves_every_hour():
    assert decayed(100.0, 0.0, HALF_LIFE) == pytest.approx(50.0)
    assert decayed(100.0, 0.0, 3 * HALF_LIFE) == pytest.approx(12.5)
    queue = JobQueue()
    queue.add(QueuedJob("a", 1))
    queue.start("a", 0.0)
    assert queue.usage(1, 30.0) == pytest.approx(30.0)  # a running job counts as it runs
    queue.finish("a", 60.0, succeeded=True)
    assert queue.usage(1, 60.0 + HALF_LIFE) == pytest.approx(30.0)


def test_two_busy_users_alternate_in_the_queue_order():
    jobs = [QueuedJob(f"a{i}", 1, created_at=i) for i in range(3)]
    jobs += [QueuedJob(f"b{i}", 2, created_at=10 + i) for i in range(3)]
    ordered = queue_order(jobs, {1: 0, 2: 0}, {1: 5.0, 2: 1.0})
    assert [j.id for j in ordered] == ["b0", "a0", "b1", "a1", "b2", "a2"]
    ordered = queue_order(jobs, {1: 0, 2: 2}, {1: 5.0, 2: 1.0})
    assert [j.id for j in ordered] == ["a0", "a1", "b0", "a2", "b1", "b2"]


job_lists = st.lists(
    st.tuples(
        st.integers(1, 5),  # user
        st.integers(-2, 2),  # priority
        st.floats(0, 100),  # created_at
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(job_lists, st.dictionaries(st.integers(1, 5), st.floats(0, 1e5)), st.integers(0, 3))
def test_the_job_picked_is_the_head_of_the_queue_order(specs, usage, running):
    queue = JobQueue()
    for user, amount in usage.items():
        queue.set_usage(user, amount, 0.0)
    for i in range(running):
        queue.add(QueuedJob(f"r{i}", user_id=i + 1))
        queue.start(f"r{i}", 0.0)
    for i, (user, priority, created) in enumerate(specs):
        queue.add(QueuedJob(f"j{i}", user, priority=priority, created_at=created))
    ordered = queue.order(50.0)
    assert sorted(j.id for j in ordered) == sorted(f"j{i}" for i in range(len(specs)))
    assert queue.pick(50.0, Limits(max_workers=10)) is ordered[0]


def test_a_waiting_job_is_told_how_many_jobs_are_ahead():
    assert jobs_ahead(0) == "0 jobs ahead of this one"
    assert jobs_ahead(1) == "1 job ahead of this one"
    assert jobs_ahead(99) == "99 jobs ahead of this one"
    assert jobs_ahead(123) == "more than 120 jobs ahead of this one"
    assert jobs_ahead(4567) == "more than 4,500 jobs ahead of this one"


def test_a_job_sent_back_to_the_queue_keeps_its_dependents_waiting():
    queue = JobQueue()
    queue.add(QueuedJob("generate", 1))
    queue.add(QueuedJob("analyse", 1, waiting_on={"generate"}))
    queue.start("generate", 0.0)

    queue.requeue("generate", 5.0)  # Docker went away before it could start

    assert queue.pending["analyse"].waiting_on == {"generate"}
    assert queue.pick(5.0, Limits(2)).id == "generate"
    assert queue.usage(1, 5.0) == pytest.approx(5.0)


# -- expected start ------------------------------------------------------------------------


def test_the_median_of_recent_runs_predicts_an_actions_runtime():
    assert median([]) is None
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 2.0, 3.0]) == 2.5
    assert expected_runtime([10.0, 30.0, 20.0], [999.0]) == 20.0  # this workspace's runs first
    assert expected_runtime([], [60.0, 80.0]) == 70.0  # else the action's runs anywhere
    assert expected_runtime([], []) == DEFAULT_RUNTIME  # else the default


def test_waiting_jobs_start_as_slots_free_in_queue_order():
    now = 1000.0
    running = [Running("r1", now - 50, 100.0), Running("r2", now - 10, 300.0)]
    waiting = [Waiting("a", 60.0), Waiting("b", 60.0), Waiting("c", 60.0)]
    starts = expected_starts(now, 2, running, waiting)
    # r1 frees its slot at now+50: a takes it, then b at now+110; r2 frees at now+290 for c
    assert starts == {"a": now + 50, "b": now + 110, "c": now + 170}


def test_free_workers_start_jobs_now_and_overdue_jobs_end_now():
    now = 1000.0
    starts = expected_starts(now, 3, [Running("late", now - 900, 60.0)], [Waiting("a", 10.0)])
    assert starts == {"a": now}
    # the only slot is held by a job past its expected runtime: it is taken to end now
    assert expected_starts(now, 1, [Running("late", now - 900, 60.0)], [Waiting("a", 10)]) == {
        "a": now
    }


def test_a_job_waiting_on_dependencies_starts_after_they_end():
    now = 0.0
    waiting = [
        Waiting("prepare", 100.0),
        Waiting("other", 10.0),
        Waiting("analyse", 5.0, ("prepare",)),
    ]
    starts = expected_starts(now, 2, [], waiting)
    assert starts["prepare"] == 0 and starts["other"] == 0
    assert starts["analyse"] == 100.0  # a slot is free at 10, but prepare ends at 100
    # needing a running job: after its expected end
    starts = expected_starts(now, 2, [Running("r", 0.0, 40.0)], [Waiting("x", 5.0, ("r",))])
    assert starts == {"x": 40.0}


def test_more_jobs_running_than_workers_free_a_slot_only_below_the_limit():
    # max_workers was lowered to 1 while three jobs run, ending at 10, 20 and 30
    running = [Running(f"r{n}", 0.0, 10.0 * n) for n in (1, 2, 3)]
    assert expected_starts(0.0, 1, running, [Waiting("a", 5.0)]) == {"a": 30.0}
    assert expected_starts(0.0, 0, running, [Waiting("a", 5.0)]) == {}
