"""The prefork pool keeps the jobs it handed to a child through a flush
(celery/compat/celery_pool.py), and what of Celery and billiard the patch relies on."""

from __future__ import annotations

import inspect
from types import SimpleNamespace
from typing import Any

from billiard.pool import ApplyResult
from celery.concurrency.asynpool import AsynPool

from smsbat_tracker.celery.compat import celery_pool


def test_upstream_flush_still_drops_every_job_no_child_accepted() -> None:
    """What the patch makes up for: Celery's flush discards each job not accepted yet (a
    job already in a child's pipe included), and a job's writer names the child it writes
    to in ``_write_to``, which billiard's ApplyResult defaults to None. When this fails,
    upstream changed: look again at whether the patch is still needed, and still right."""
    flush = inspect.getsource(inspect.unwrap(AsynPool.flush))
    assert "if not job._accepted:" in flush
    assert "job.discard()" in flush
    source = inspect.getsource(AsynPool)
    assert "job._write_to = proc" in source
    assert ApplyResult._write_to is None
    assert "_accepted" in inspect.getsource(ApplyResult.__init__)
    assert "self._cache.pop(self._job, None)" in inspect.getsource(ApplyResult.discard)


def _job(number: int, *, accepted: bool, child: Any) -> Any:
    return SimpleNamespace(_job=number, _accepted=accepted, _write_to=child)


def test_jobs_a_live_child_holds_come_back_after_the_flush() -> None:
    """A job written to a live child, dropped by the flush, is back in the cache (its
    acceptance and result will find it); one still in the outbound buffer, or written to a
    child that died, stays dropped; an accepted one is left as the flush left it."""
    alive = SimpleNamespace(_is_alive=lambda: True)
    dead = SimpleNamespace(_is_alive=lambda: False)
    jobs = {
        1: _job(1, accepted=False, child=alive),  # in the child's pipe: it will run
        2: _job(2, accepted=False, child=None),  # not written yet: given back
        3: _job(3, accepted=False, child=dead),  # its child died: given back
        4: _job(4, accepted=True, child=alive),  # running: the flush keeps it
    }
    pool = SimpleNamespace(_cache=dict(jobs))

    def upstream(self: Any) -> None:  # what AsynPool.flush does to the cache
        for job in list(self._cache.values()):
            if not job._accepted:
                self._cache.pop(job._job, None)

    celery_pool.keep_handed_jobs(upstream)(pool)
    assert sorted(pool._cache) == [1, 4]
    assert pool._cache[1] is jobs[1]


def test_install_patches_once() -> None:
    """Installed twice, the flush is wrapped once."""
    celery_pool.install()
    patched = AsynPool.flush
    celery_pool.install()
    assert AsynPool.flush is patched
    assert celery_pool.installed()
