"""A prepacked session of the in-place weights, made in a background thread and swapped in off the request path.

The ONNX Runtime CPU session that takes LoRAs (ort_weights.py) runs without weight prepacking: its kernels read
the buffers LiveWeights rewrites, so MatMul packs its weights again on every call (measured 1.01x-1.18x a
prepacked session on SD 1.5's UNet). After each change of those buffers a background thread makes a second
session over the same buffers with prepacking on: MatMul, Gemm and Attention copy their weights into packed form
while the session is made, other kernels (convolutions) keep reading the buffers, as the in-place session does.
The build starts at the first run after the change (never beside the merge itself), and a later run swaps it
in; nothing waits for it. Before the buffers change again the engine runs the in-place session again and this one
is dropped (its packed copies would be stale: checked in tests/test_lora_prepacked.py); a session still being
made then is thrown away when done, and made again for the new values. One build at a time. Cost: the packed
copies (about the size of the MatMul weights) beside the buffers, and the build's CPU time, shared with whatever
runs meanwhile (the first generation after a switch). No build where the machine's available memory is under
twice those copies (SDXL's UNet on a small machine, say): the in-place session then keeps running.
"""

import logging
import threading
import time

log = logging.getLogger("sdrt.engines")
ROOM_FACTOR = 2  # a prepacked session is made only with this many times its packed copies' bytes available


def available_bytes() -> int | None:
    """The machine's available memory (psutil), or None where it cannot say."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except (ImportError, OSError):
        return None


class PrepackedSwap:
    """Background builds of BUILD() -> (session, what must live as long as it) for the buffers' current values."""

    def __init__(self, build):
        self.build = build
        self.live = None  # the in-place session: what runs while no prepacked session is ready
        self.builds = 0  # prepacked sessions made (kept or thrown away)
        self.last_build_s: float | None = None  # how long the last one took (benchmarks)
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._version = 0  # counts changes of the buffers
        self._wanted: int | None = None  # the version a build is asked for (None: none)
        self._ready = None  # (session, keep) of the current version, not swapped in yet
        self.current = None  # (session, keep) swapped in
        self._running = False

    def stale(self) -> None:
        """The buffers are about to change: no session made from their old values may be swapped in."""
        with self._lock:
            self._version += 1
            self._ready = self._wanted = self.current = None

    def want(self) -> None:
        """A prepacked session of the buffers as they are now is wanted: the next take() starts making it."""
        with self._lock:
            self._wanted = self._version

    def _start(self) -> None:
        """(Under the lock.) Make the wanted session in a background thread, unless one is being made."""
        if self._running:  # the running build notices the newer version when it ends
            return
        self._running = True
        threading.Thread(target=self._work, name="sdrt-prepack", daemon=True).start()

    def _work(self) -> None:
        while True:
            with self._lock:
                version = self._wanted
                if version is None or version != self._version:
                    self._running = False
                    self._done.notify_all()
                    return
            start = time.perf_counter()
            try:
                made = self.build()
            except Exception as e:  # the in-place session keeps running: slower, never wrong
                log.warning("no prepacked session behind the LoRA weights (%s)", e)
                made = None
            with self._lock:
                self.builds, self.last_build_s = self.builds + 1, time.perf_counter() - start
                if made is not None and version == self._version == self._wanted:
                    self._ready, self._wanted = made, None
                elif made is None and self._wanted == version:
                    self._wanted = None

    def take(self):
        """(session, keep) ready to be swapped in, once; None while none is. The first call after want() starts the
        build: a session is made only for weights that run, and never beside the merge that changes them (a
        first LoRA right after the load, say)."""
        with self._lock:
            made, self._ready = self._ready, None
            if made is not None:
                self.current = made  # kept while it may run: ONNX Runtime reads the overrides' buffers
            elif self._wanted is not None and self._wanted == self._version:
                self._start()
            return made

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no build runs (benchmarks, tests); True if a prepacked session of the current values is ready
        or already swapped in."""
        with self._lock:
            self._done.wait_for(lambda: not self._running, timeout)
            return self._ready is not None or self.current is not None


class SwapsPrepacked:
    """OnnxRuntimeEngine's side of the swap (its session, _live and _swap; merges call _writing, then _written)."""

    def _writing(self) -> None:
        """Before the in-place buffers change: run the in-place session again (a prepacked one's copies go stale)."""
        if self.session is not None and self._swap.live is not None:
            self.session, self._shape_sets = self._swap.live, {}
        self._swap.stale()

    def _written(self) -> None:
        """After they changed: a prepacked session of the new values is wanted (made in the background from the
        next run on, swapped in by a later one)."""
        if self.PREPACK_BEHIND and self.session is not None and self._live is not None:
            self._swap.want()

    def _prepacked(self):
        """(a session over the in-place buffers with prepacking on, its overrides): PrepackedSwap's build."""
        live = self._live
        if live is None:
            return None
        packed = sum(buffer.nbytes for buffer in live.buffers.values() if buffer.ndim == 2)  # MatMul/Gemm weights
        available = available_bytes()
        if available is not None and available < ROOM_FACTOR * packed:
            log.info("%s: no prepacked session behind the LoRA weights (%.1f GB of packed copies, %.1f GB available)",
                     self.model_file, packed / 1e9, available / 1e9)  # fmt: skip
            return None
        overrides = live.overrides()
        return self._session(live.optimised_file, False, overrides=overrides, keep=False), overrides

    def _swap_in(self) -> None:
        """The prepacked session of the current weights, if one is ready, becomes the one that runs."""
        made = self._swap.take()
        if made is not None and self.session is not None and self.session is self._swap.live:
            self.session, self._shape_sets = made[0], {}
