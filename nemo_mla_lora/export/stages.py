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
    to_process, to_write = queue.Queue(1), queue.Queue(1)
    stop, errors = threading.Event(), []
    busy = {"read": 0.0, "process": 0.0, "write": 0.0}
    written, progress = [0], threading.Condition()  # units written so far; notified after each

    def wait_written(count: int) -> bool:
        """Until ``count`` units are written (False if stopped first)."""
        with progress:
            while written[0] < count and not stop.is_set():
                progress.wait(0.1)
        return not stop.is_set()

    def guarded(body):
        def target():
            try:
                body()
            except BaseException as err:  # handed to the caller
                errors.append(err)
                stop.set()

        return target

    def reader():
        after_alone = False  # the unit before was alone: this one waits for it to be written
        for index, unit in enumerate(units):
            by_itself = bool(alone and alone(unit))
            if (by_itself or after_alone) and not wait_written(index):
                return
            after_alone = by_itself
            start = time.perf_counter()
            tensors = read(unit)
            busy["read"] += time.perf_counter() - start
            if not _put(to_process, (unit, tensors), stop):
                return
            del tensors
        _put(to_process, _DONE, stop)

    def writer():
        while (item := _get(to_write, stop)) is not _DONE:
            unit, tensors = item
            start = time.perf_counter()
            write(unit, tensors)
            busy["write"] += time.perf_counter() - start
            del item, tensors
            if on_done:
                on_done(unit)  # before the count: a unit waiting to be alone finds this one's memory released
            with progress:
                written[0] += 1
                progress.notify_all()

    threads = [threading.Thread(target=guarded(f), name=f"export-{f.__name__}", daemon=True) for f in (reader, writer)]
    wall = time.perf_counter()
    for t in threads:
        t.start()
    try:
        while (item := _get(to_process, stop)) is not _DONE:
            unit, tensors = item
            del item
            start = time.perf_counter()
            out = process(unit, tensors)
            del tensors
            busy["process"] += time.perf_counter() - start
            if not _put(to_write, (unit, out), stop):
                break
            del out
        _put(to_write, _DONE, stop)
        threads[1].join()
    except BaseException as err:
        errors.append(err)
    finally:
        stop.set()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return {**{k: round(v, 2) for k, v in busy.items()}, "wall": round(time.perf_counter() - wall, 2)}
