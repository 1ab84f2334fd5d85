"""The progress of `sdrt serve --ray`'s replicas: every running job by its task id on one JobBoard actor, reported
to it by each replica's Reporter, read by the ingress for /sdapi/v1/progress and /interrupt (ray_app.py)."""


class JobBoard:
    """The running jobs of every replica by task id, as /sdapi/v1/progress reports them (a Ray actor)."""

    def __init__(self):
        from sdrt.server.jobs import State

        self.new_state = State
        self.jobs = {}  # task id -> State, in start order
        self.interrupted: set[str] = set()

    def begin(self, jobs: list[tuple[str, int, str]]) -> None:
        """JOBS [(kind, batches, task id)] start on a replica."""
        for kind, batches, task_id in jobs:
            state = self.new_state()
            state.begin(kind, batches, task_id)
            self.jobs[task_id] = state

    def step(self, task_ids: list[str], step: int, total: int, images: dict) -> list[str]:
        """Progress of jobs running together; IMAGES {task id: base64 PNG preview}; returns the interrupted ones."""
        for task_id in task_ids:
            state = self.jobs.get(task_id)
            if state is not None:
                state.advance(step, total)
                state.current_image = images.get(task_id, state.current_image)
        return [task_id for task_id in task_ids if task_id in self.interrupted]

    def end(self, task_ids: list[str]) -> None:
        for task_id in task_ids:
            self.jobs.pop(task_id, None)
            self.interrupted.discard(task_id)

    def interrupt(self, task_id: str | None) -> None:
        """A1111's Interrupt: every running job, or the one with TASK_ID."""
        for running, state in self.jobs.items():
            if task_id in (None, running):
                state.interrupted = True
                self.interrupted.add(running)

    def progress(self, skip_current_image: bool, task_id: str | None) -> dict:
        """A1111's ProgressResponse for TASK_ID's job, or the oldest running one; idle if none."""
        from sdrt.server.generation import idle_progress

        state = self.jobs.get(task_id) if task_id is not None else next(iter(self.jobs.values()), None)
        if state is None:
            return idle_progress()
        done, eta = state.progress()
        image = None if skip_current_image else state.current_image
        others = len(self.jobs) - 1
        text = f"{others} more job(s) running on other replicas or in the same batch" if others else None
        return {"progress": done, "eta_relative": eta, "state": state.as_dict(), "current_image": image,
                "textinfo": text}  # fmt: skip


class Reporter:
    """A replica's Pipeline callback for GENERATIONS running together (first images at OFFSETS of the batch):
    progress and live previews to the JobBoard; raises Interrupted once every one of them is interrupted."""

    def __init__(self, board, pipe, generations, offsets: list[int]):
        self.board, self.pipe, self.generations, self.offsets = board, pipe, generations, offsets
        self.task_ids = [g.task_id for g in generations]
        self.interrupted: set[str] = set()
        self.pending = None  # the JobBoard's answer to an earlier step, read when it has come
        board.begin.remote([(g.kind, g.batches, g.task_id) for g in generations])

    def __call__(self, step: int, total: int, denoised) -> None:
        import ray

        from sdrt.errors import Interrupted
        from sdrt.server.generation import preview_png

        if self.pending is not None and ray.wait([self.pending], timeout=0)[0]:
            self.interrupted.update(ray.get(self.pending))
            self.pending = None
        if self.interrupted.issuperset(self.task_ids):
            raise Interrupted()
        images = {}
        every = self.generations[0].preview_every
        if every > 0 and denoised is not None and step % every == 0:
            for generation, offset in zip(self.generations, self.offsets, strict=True):
                images[generation.task_id] = preview_png(
                    self.pipe, denoised[offset : offset + 1], generation.preview_method
                )
        answer = self.board.step.remote(self.task_ids, step, total, images)
        if self.pending is None:
            self.pending = answer

    def close(self) -> None:
        self.board.end.remote(self.task_ids)
