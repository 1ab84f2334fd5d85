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

    def step(self, task_ids: list[str], step: int, total: int, images: dict) -> dict:
        """Progress of jobs running together; IMAGES {task id: base64 PNG preview of STEP}. Returns {"interrupted":
        task ids, "wanted": task ids a /progress poll asked a preview of since their last one}."""
        for task_id in task_ids:
            state = self.jobs.get(task_id)
            if state is not None:
                state.advance(step, total)
                if task_id in images:
                    state.current_image, state.preview_step, state.preview_wanted = images[task_id], step, False
        wanted = [t for t in task_ids if t in self.jobs and self.jobs[t].preview_wanted]
        return {"interrupted": [t for t in task_ids if t in self.interrupted], "wanted": wanted}

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
        state.preview_wanted = state.preview_wanted or not skip_current_image  # the replica decodes it lazily
        done, eta = state.progress()
        image = None if skip_current_image else state.current_image
        others = len(self.jobs) - 1
        text = f"{others} more job(s) running on other replicas or in the same batch" if others else None
        return {"progress": done, "eta_relative": eta, "state": state.as_dict(), "current_image": image,
                "textinfo": text}  # fmt: skip


class Reporter:
    """A replica's Pipeline callback for GENERATIONS running together (first images at OFFSETS of the batch):
    progress to the JobBoard, and a live preview of a job's current x0 only when a /progress poll asked for one and at
    least show_progress_every_n_steps passed since its last (as the one-process worker, jobs.py: nobody polling, no
    decode); raises Interrupted once every one of them is interrupted."""

    def __init__(self, board, pipe, generations, offsets: list[int]):
        self.board, self.pipe, self.generations, self.offsets = board, pipe, generations, offsets
        self.task_ids = [g.task_id for g in generations]
        self.interrupted: set[str] = set()
        self.wanted: set[str] = set()  # jobs whose preview a poll asked for (the board's latest answer)
        self.preview_steps: dict[str, int] = {}  # task id -> the step of its last preview
        self.pending = None  # (the JobBoard's answer to an earlier step, that step), read when it has come
        board.begin.remote([(g.kind, g.batches, g.task_id) for g in generations])

    def __call__(self, step: int, total: int, denoised) -> None:
        from sdrt.errors import Interrupted

        self.read_answer()
        if self.interrupted.issuperset(self.task_ids):
            raise Interrupted()
        answer = self.board.step.remote(self.task_ids, step, total, self.previews(step, denoised))
        if self.pending is None:
            self.pending = (answer, step)

    def read_answer(self) -> None:
        """The board's answer to an earlier step, if it has come: interrupted jobs, and the previews asked for (a job
        previewed since that step was answered is not asked for again by it)."""
        import ray

        if self.pending is None or not ray.wait([self.pending[0]], timeout=0)[0]:
            return
        answer, asked_at = ray.get(self.pending[0]), self.pending[1]
        self.pending = None
        self.interrupted.update(answer["interrupted"])
        self.wanted = {t for t in answer["wanted"] if self.preview_steps.get(t, -1) < asked_at}

    def previews(self, step: int, denoised) -> dict:
        """{task id: base64 PNG} of the wanted jobs whose last preview is at least preview_every steps old."""
        from sdrt.server.generation import preview_png

        every, images = self.generations[0].preview_every, {}
        if every <= 0 or denoised is None:
            return images
        for generation, offset in zip(self.generations, self.offsets, strict=True):
            task_id, last = generation.task_id, self.preview_steps.get(generation.task_id)
            if task_id in self.wanted and (last is None or step - last >= every):
                images[task_id] = preview_png(self.pipe, denoised[offset : offset + 1], generation.preview_method)
                self.preview_steps[task_id] = step
                self.wanted.discard(task_id)
        return images

    def close(self) -> None:
        self.board.end.remote(self.task_ids)
