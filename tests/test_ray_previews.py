"""Lazy live previews under `sdrt serve --ray` (server/ray_progress.py): a replica's Reporter decodes a job's current
x0 only when a /progress poll asked the JobBoard for current_image, at least show_progress_every_n_steps apart (as
the one-process worker, test_taesd.py); nobody polling, no decode. A poll made after step k is seen in the board's
answer to step k + 1, which the replica reads at step k + 2 (it never waits for the board): one step later than the
one-process worker. The JobBoard and the Reporter run here as they run
in the actor and the replica, the actor's .remote calls answered in this process (the real Ray server:
test_server_ray.py)."""

from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("ray")


class LocalActor:
    """An actor handle whose METHOD.remote(...) runs the method here and returns its result as the 'object ref'."""

    def __init__(self, target):
        self.target = target

    def __getattr__(self, name):
        method = getattr(self.target, name)
        return SimpleNamespace(remote=lambda *args: method(*args))


class FakePipe:
    def __init__(self):
        self.decoded = []  # (first pixel's latent value = the step, method)

    def preview(self, latents, method):
        from PIL import Image

        self.decoded.append((int(latents[0, 0, 0, 0]), method))
        return [Image.new("RGB", (8, 8))]


@pytest.fixture
def local_ray(monkeypatch):
    """ray.wait / ray.get on LocalActor's results: every answer has come already."""
    import ray

    monkeypatch.setattr(ray, "wait", lambda refs, timeout=None: (list(refs), []))
    monkeypatch.setattr(ray, "get", lambda ref: ref)


def run(steps: int, every: int, polls: dict, skip_polls: set = frozenset(), batch: int = 1):
    """STEPS steps of BATCH jobs on one replica; POLLS {step: task ids polled after it}; what the pipe decoded."""
    from sdrt.server.ray_progress import JobBoard, Reporter

    board, pipe = JobBoard(), FakePipe()
    generations = [SimpleNamespace(kind="txt2img", batches=1, task_id=f"task({i})", preview_every=every,
                                   preview_method="TAESD") for i in range(batch)]  # fmt: skip
    reporter = Reporter(LocalActor(board), pipe, generations, list(range(batch)))
    for step in range(1, steps + 1):
        reporter(step, steps, np.full((batch, 4, 8, 8), step, np.float32))
        for task_id in polls.get(step, ()):
            board.progress(step in skip_polls, task_id)
    images = {t: board.jobs[t].current_image for t in board.jobs}
    reporter.close()
    return pipe.decoded, images


@pytest.mark.parametrize(
    ("polls", "skip", "every", "want"),
    [({}, set(), 1, []), ({2: ["task(0)"], 3: ["task(0)"]}, {2, 3}, 1, []),
     ({2: ["task(0)"], 3: ["task(0)"], 4: ["task(0)"], 8: ["task(0)"]}, set(), 1, [4, 6, 10]),
     ({s: ["task(0)"] for s in range(1, 8)}, set(), 3, [3, 6, 9])],
    ids=["no-poller", "skip-image-polls", "every-step", "every-3"],
)  # fmt: skip
def test_replica_decodes_only_when_polled(local_ray, polls, skip, every, want):
    decoded, images = run(10, every, polls, skip)
    assert [step for step, _ in decoded] == want
    assert all(method == "TAESD" for _, method in decoded)
    assert (images["task(0)"] is not None) == bool(want)


def test_batched_jobs_each_previewed_when_their_own_poll_asks(local_ray):
    """Two requests batched on one replica: only the polled one's image is decoded (its own latents)."""
    decoded, images = run(6, 1, {2: ["task(1)"], 4: ["task(1)"]}, batch=2)
    assert [step for step, _ in decoded] == [4, 6]
    assert images["task(0)"] is None and images["task(1)"] is not None


def test_a_poll_without_task_id_asks_for_the_oldest_job(local_ray):
    from sdrt.server.ray_progress import JobBoard

    board = JobBoard()
    board.begin([("txt2img", 1, "task(a)"), ("txt2img", 1, "task(b)")])
    board.progress(False, None)
    assert board.step(["task(a)", "task(b)"], 1, 4, {}) == {"interrupted": [], "wanted": ["task(a)"]}
    board.interrupt("task(b)")
    assert board.step(["task(a)", "task(b)"], 2, 4, {"task(a)": "png"}) == {"interrupted": ["task(b)"], "wanted": []}
    assert board.progress(False, "task(a)")["current_image"] == "png"
