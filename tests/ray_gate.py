"""`python tests/ray_gate.py serve --ray ...`: sdrt's CLI whose Ray Generator replicas hold requests and jobs at a
gate (tests only; test_server_ray.py's server). Which requests share a replica's UNet batch, whether the replicas and
the queue are full at a given moment, and whether a job still runs when a test looks at it depend on timing; a test
that needs one of those conditions creates it with the gate instead. GATE is the folder $SDRT_TEST_RAY_GATE names:

- while the file GATE/hold exists, a request that reaches a replica writes GATE/arrived/<replica pid>-<task id> and
  waits, counted by Ray Serve among the replica's ongoing requests; when the test deletes GATE/hold, every waiting
  request goes on into Generator.generate within one poll period (POLL_S), far inside the batch window: the
  requests held on one replica meet in one batch;
- while GATE/pause-at holds a step number N, a running job stops once it has reported step N to the JobBoard (the
  board shows step N; the job cannot finish) until the file is gone or names a later step;
- every batched Pipeline call (Generator.run_batch) writes GATE/batches/<replica pid>-<n>: its requests' task ids.

Without those files a request goes straight on (a file check per request and per step). The subclass is sent to the
replicas by value (cloudpickle pickles what a function defines), so the replicas need nothing from tests/.
"""

import asyncio
import itertools
import os
import sys
import time

GATE_ENV = "SDRT_TEST_RAY_GATE"
POLL_S = 0.01  # how often a held request or job looks at the gate (the batch window of the tests' server: 0.2 s)


def file_name(task_id: str) -> str:
    """TASK_ID (a client may choose it: force_task_id) as a file name, with this process's id in front."""
    return f"{os.getpid()}-" + "".join(c if c.isalnum() or c in "()-_" else "_" for c in task_id)[:100]


def paused_at(gate: str) -> float:
    """The step GATE/pause-at names (infinity: none)."""
    try:
        with open(os.path.join(gate, "pause-at")) as f:
            return int(f.read())
    except (FileNotFoundError, ValueError):
        return float("inf")


class PausingBoard:
    """The JobBoard as a replica's Reporter uses it (.begin/.step/.end.remote), the job held after each step it
    reports while GATE/pause-at names that step or an earlier one."""

    def __init__(self, board, gate: str):
        self.board, self.gate = board, gate
        self.begin, self.end, self.step = board.begin, board.end, self

    def remote(self, task_ids, step, total, images):  # board.step.remote
        answer = self.board.step.remote(task_ids, step, total, images)
        while step >= paused_at(self.gate):
            time.sleep(POLL_S)
        return answer


def main() -> int:
    from sdrt.cli import main as cli_main
    from sdrt.server import ray_app

    batches = itertools.count()

    class GatedGenerator(ray_app.Generator):
        """ray_app.Generator with the gate in front of generate(), jobs paused on request, each batch recorded."""

        async def generate(self, generation, board) -> list:
            gate = os.environ.get(GATE_ENV)
            hold = None if gate is None else os.path.join(gate, "hold")
            if hold is not None and os.path.exists(hold):
                with open(os.path.join(gate, "arrived", file_name(generation.task_id)), "w"):
                    pass
                while os.path.exists(hold):
                    await asyncio.sleep(POLL_S)
            return await ray_app.Generator.generate(self, generation, board)

        def run_alone(self, generation, board) -> list:
            gate = os.environ.get(GATE_ENV)
            return ray_app.Generator.run_alone(self, generation, board if gate is None else PausingBoard(board, gate))

        def run_batch(self, generations: list, board) -> list:
            gate = os.environ.get(GATE_ENV)
            if gate is None:
                return ray_app.Generator.run_batch(self, generations, board)
            with open(os.path.join(gate, "batches", f"{os.getpid()}-{next(batches)}"), "w") as f:
                f.write("\n".join(file_name(g.task_id) for g in generations))
            return ray_app.Generator.run_batch(self, generations, PausingBoard(board, gate))

    generator, build = ray_app.Generator, ray_app.build

    def gated_build(*args, **kwargs):
        """build() deploys the module's Generator: GatedGenerator while it runs, and only then (cloudpickle finds
        Generator, the base class, in the module: sent by reference)."""
        ray_app.Generator = GatedGenerator
        try:
            return build(*args, **kwargs)
        finally:
            ray_app.Generator = generator

    ray_app.build = gated_build  # serve_ray calls the module's build
    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
