"""Three stages over the export's units: a reader thread, the calling thread (merge, verify) and a writer thread.

Reading the next unit and writing the previous one overlap the work on the current one (file I/O, hashing
and torch's kernels release the GIL). A unit is handed over, not queued: a stage starts on its next unit
only once the one after it has taken the last, so memory holds three units (reading, working, writing),
not five. A unit ``alone`` says is large (the embedding, the output layer: a vocabulary's rows, several times the
budget of the others) is in memory by itself: the reader starts it once every unit before it is written, and the
next once it is written, so the peak is the largest unit, not the largest plus two others. The first error in any
stage stops the others and is raised in the caller; so is Ctrl-C. ``run`` returns each stage's busy seconds and
the wall time.
"""

import queue
import threading
import time

_DONE = object()


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Hand ``item`` over: returns once the consumer has taken it (False if stopped first)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            break
        except queue.Full:
            continue
    with q.all_tasks_done:
        while q.unfinished_tasks and not stop.is_set():
            q.all_tasks_done.wait(0.1)
    return not stop.is_set()


def _get(q: queue.Queue, stop: threading.Event):
    while not stop.is_set():
        try:
            item = q.get(timeout=0.1)
            q.task_done()  # taken: the producer may go on
            return item
        except queue.Empty:
            continue
    return _DONE


def run(units, read, process, write, on_done=None, alone=None) -> dict:
    """``read(unit) -> tensors`` (reader thread), ``process(unit, tensors) -> tensors`` (here),
    ``write(unit, tensors)`` (writer thread), ``on_done(unit)`` after each write; ``alone(unit)``: whether the
    unit is in memory by itself (default: none is)."""
    return _Stages(read, process, write, on_done, alone).run(units)


class _Stages:
    """One run's hand-over queues, stop flag, first errors, busy seconds and count of units written."""

    def __init__(self, read, process, write, on_done, alone):
        self.read, self.process, self.write, self.on_done, self.alone = read, process, write, on_done, alone
        self.to_process, self.to_write = queue.Queue(1), queue.Queue(1)
        self.stop, self.errors = threading.Event(), []
        self.busy = {"read": 0.0, "process": 0.0, "write": 0.0}
        self.written, self.progress = 0, threading.Condition()  # units written so far; notified after each

    def run(self, units) -> dict:
        threads = [
            threading.Thread(target=self._guarded(body), name=f"export-{name}", daemon=True)
            for name, body in (("reader", lambda: self._reader(units)), ("writer", self._writer))
        ]
        wall = time.perf_counter()
        for t in threads:
            t.start()
        try:
            self._process_all()
            threads[1].join()
        except BaseException as err:
            self.errors.append(err)
        finally:
            self.stop.set()
            for t in threads:
                t.join()
        if self.errors:
            raise self.errors[0]
        return {**{k: round(v, 2) for k, v in self.busy.items()}, "wall": round(time.perf_counter() - wall, 2)}

    def _guarded(self, body):
        def target():
            try:
                body()
            except BaseException as err:  # handed to the caller
                self.errors.append(err)
                self.stop.set()

        return target

    def _wait_written(self, count: int) -> bool:
        """Until ``count`` units are written (False if stopped first)."""
        with self.progress:
            while self.written < count and not self.stop.is_set():
                self.progress.wait(0.1)
        return not self.stop.is_set()

    def _reader(self, units) -> None:
        after_alone = False  # the unit before was alone: this one waits for it to be written
        for index, unit in enumerate(units):
            by_itself = bool(self.alone and self.alone(unit))
            if (by_itself or after_alone) and not self._wait_written(index):
                return
            after_alone = by_itself
            start = time.perf_counter()
            tensors = self.read(unit)
            self.busy["read"] += time.perf_counter() - start
            if not _put(self.to_process, (unit, tensors), self.stop):
                return
            del tensors
        _put(self.to_process, _DONE, self.stop)

    def _process_all(self) -> None:
        """The calling thread's stage, until the reader's last unit is handed to the writer."""
        while (item := _get(self.to_process, self.stop)) is not _DONE:
            unit, tensors = item
            del item
            start = time.perf_counter()
            out = self.process(unit, tensors)
            del tensors
            self.busy["process"] += time.perf_counter() - start
            if not _put(self.to_write, (unit, out), self.stop):
                break
            del out
        _put(self.to_write, _DONE, self.stop)

    def _writer(self) -> None:
        while (item := _get(self.to_write, self.stop)) is not _DONE:
            unit, tensors = item
            start = time.perf_counter()
            self.write(unit, tensors)
            self.busy["write"] += time.perf_counter() - start
            del item, tensors
            if self.on_done:
                self.on_done(unit)  # before the count: a unit waiting to be alone finds this one's memory released
            with self.progress:
                self.written += 1
                self.progress.notify_all()
