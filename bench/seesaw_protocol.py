"""A thread model of the seesaw Gluon decode kernel's protocol (``inference/kernels/gluon_seesaw.py``), checked on a
CPU before any GPU time: one producer and two consumer threads, mbarriers with phases (a wait on parity P passes once
phase P has completed; a fresh barrier passes parity 1), the same buffers (two stages of two c_kv halves and a rope box
that later carries P, a row max and a row sum per stage), the same order of waits, arrivals and loads as the kernel,
and random delays between steps. Every read checks which tile the buffer holds; the float64 result is checked against
softmax attention over the valid positions (the last tile partial).

    python bench/seesaw_protocol.py                  # 0-8 tiles per split, 40 seeds each: expect "0 failures"
    python bench/seesaw_protocol.py --mutate late_release   # a known mistake: expect deadlocks
    python bench/seesaw_protocol.py --mutate unscaled_p     # another: expect mismatches

Index legend: h heads, t positions in a tile, c latent half width, r rope width (toy sizes).
"""

import argparse
import random
import sys
import threading
import time

import numpy as np

STAGES = 2
WAIT_S = 5.0  # a wait longer than this is a deadlock


class MBarrier:
    """An mbarrier of ``count`` arrivals per phase; ``wait(parity)`` returns once the phase of that parity has
    completed (the current phase's parity differs)."""

    def __init__(self, count: int = 1):
        self.count, self.pending, self.phase, self.cv = count, count, 0, threading.Condition()

    def arrive(self):
        with self.cv:
            self.pending -= 1
            if self.pending == 0:
                self.phase, self.pending = self.phase + 1, self.count
                self.cv.notify_all()

    def wait(self, parity: int):
        with self.cv:
            if not self.cv.wait_for(lambda: (self.phase - parity) % 2 == 1, WAIT_S):
                raise TimeoutError("deadlock")


def _jitter(rng: random.Random):
    time.sleep(rng.random() * 1e-4)


class Split:
    """One CTA's split of n tiles: its shared buffers, barriers and inputs."""

    def __init__(self, n: int, seed: int, T: int = 4, H: int = 3, C: int = 4, R: int = 1, mutate: str = ""):
        g = np.random.default_rng(seed)
        self.n, self.T, self.C, self.mutate = n, T, C, mutate
        self.rng = [random.Random(seed * 3 + i) for i in range(3)]
        self.q = g.normal(size=(H, 2 * C + R))  # [h, 2c + r]
        self.k = g.normal(size=(n * T, 2 * C + R))  # [t_all, 2c + r]; V = its first 2c columns
        self.valid = n * T - int(g.integers(0, T)) if n else 0  # the last tile partial
        self.kv, self.kr, self.m, self.r = [None] * (2 * STAGES), [None] * STAGES, [None] * STAGES, [None] * STAGES
        self.ready_a, self.ready_b, self.free_a, self.free_b, self.m_ready, self.p_ready = (
            [MBarrier() for _ in range(STAGES)] for _ in range(6)
        )
        self.out, self.errors = {}, []

    def read(self, buf, i, tag, tile):
        """The buffer's payload, after checking it holds ``tag`` of ``tile``."""
        got = buf[i]
        assert got is not None and got[:2] == (tag, tile), f"expected {tag} of tile {tile}, found {got and got[:2]}"
        return got[2]

    def producer(self):
        """Tile k's part A (owner's half), then tile k - 1's part B (other half + rope), each once released."""
        try:
            self._load_all()
        except Exception as err:  # a deadlock
            self.errors.append(f"producer: {type(err).__name__}: {err}")

    def _load_all(self):
        T, C = self.T, self.C
        for k in range(self.n + 1):
            _jitter(self.rng[0])
            if k < self.n:
                s, half = k % STAGES, k % 2
                self.free_a[s].wait(((k // STAGES) & 1) ^ 1)
                self.kv[2 * s + half] = ("kv", (k, half), self.k[k * T : (k + 1) * T, half * C : (half + 1) * C])
                self.ready_a[s].arrive()
            if k > 0:
                i = k - 1
                s, half = i % STAGES, 1 - i % 2
                self.free_b[s].wait(((i // STAGES) & 1) ^ 1)
                self.kv[2 * s + half] = ("kv", (i, half), self.k[i * T : (i + 1) * T, half * C : (half + 1) * C])
                self.kr[s] = ("rope", i, self.k[i * T : (i + 1) * T, 2 * C :])
                self.ready_b[s].arrive()

    def add_other(self, i, W, o, l_sum):
        """The other consumer's tile i, handed over in this consumer's units: O += P_i V_i[:, W half], l += r_i."""
        s = i % STAGES
        self.ready_b[s].wait((i // STAGES) & 1)
        self.p_ready[s].wait((i // STAGES) & 1)
        return o + self.read(self.kr, s, "P", i) @ self.read(self.kv, 2 * s + W, "kv", (i, W)), l_sum + self.read(
            self.r, s, "r", i
        )

    def own_tile(self, j, W, o, l_sum, m_ref, m_prev):
        """Scores, running max (published), softmax, own P V and the other's tile j - 1, then P_j handed over."""
        s, ph, T, C = j % STAGES, (j // STAGES) & 1, self.T, self.C
        self.ready_a[s].wait(ph)
        mine = self.read(self.kv, 2 * s + W, "kv", (j, W))
        _jitter(self.rng[1 + W])
        self.ready_b[s].wait(ph)
        key = np.zeros((T, self.k.shape[1]))  # [t, 2c + r]
        key[:, W * C : (W + 1) * C] = mine
        key[:, (1 - W) * C : (2 - W) * C] = self.read(self.kv, 2 * s + 1 - W, "kv", (j, 1 - W))
        key[:, 2 * C :] = self.read(self.kr, s, "rope", j)
        scores = self.q @ key.T  # [h, t]
        scores[:, j * T + np.arange(T) >= self.valid] = -np.inf
        m_j = np.maximum(m_prev, scores.max(1))
        self.m[s] = ("m", j, m_j)
        self.m_ready[s].arrive()
        p = np.exp(scores - m_j[:, None])
        alpha = np.exp(m_ref - m_j)
        o, l_sum = o * alpha[:, None] + p @ mine, l_sum * alpha + p.sum(1)
        if j > 0:
            o, l_sum = self.add_other(j - 1, W, o, l_sum)
        self.free_a[s].arrive()
        if j > 0 and self.mutate != "late_release":
            self.free_b[(j - 1) % STAGES].arrive()
        m_next = m_j
        if j + 1 < self.n:
            self.m_ready[(j + 1) % STAGES].wait(((j + 1) // STAGES) & 1)
            m_next = self.read(self.m, (j + 1) % STAGES, "m", j + 1)
        if j > 0 and self.mutate == "late_release":  # the order the kernel avoids: release after the next max
            self.free_b[(j - 1) % STAGES].arrive()
        scale = np.ones_like(m_j) if self.mutate == "unscaled_p" else np.exp(m_j - m_next)
        self.kr[s], self.r[s] = ("P", j, p * scale[:, None]), ("r", j, p.sum(1) * scale)
        _jitter(self.rng[1 + W])
        self.p_ready[s].arrive()
        return o, l_sum, m_j, m_next

    def consumer(self, W: int):
        """Tiles j = W, W + 2, ...; then the other's last tile if it comes after."""
        try:
            h = self.q.shape[0]
            m_ref, l_sum, o = np.full(h, -np.inf), np.zeros(h), np.zeros((h, self.C))
            m_next = m_ref
            if self.n > 0 and W == 1:
                self.m_ready[0].wait(0)
                m_next = self.read(self.m, 0, "m", 0)
            own = -(-(self.n - W) // 2)
            for k in range(own):
                o, l_sum, m_ref, m_next = self.own_tile(2 * k + W, W, o, l_sum, m_ref, m_next)
            last = 2 * own + W - 1
            if 0 <= last < self.n:
                alpha = np.exp(m_ref - m_next)
                o, l_sum = self.add_other(last, W, o * alpha[:, None], l_sum * alpha)
                self.free_b[last % STAGES].arrive()
                m_ref = m_next
            self.out[W] = (o, l_sum, m_ref)
        except Exception as err:  # a deadlock or a wrong buffer
            self.errors.append(f"consumer {W}: {type(err).__name__}: {err}")

    def run(self) -> list[str]:
        """Runs the three threads; the problems found (empty: none)."""
        threads = [threading.Thread(target=self.producer, daemon=True)]
        threads += [threading.Thread(target=self.consumer, args=(w,), daemon=True) for w in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(3 * WAIT_S)
        if self.errors or len(self.out) < 2:
            return self.errors or ["a thread did not finish"]
        if self.n == 0:
            return [] if all(not self.out[w][1].any() for w in (0, 1)) else ["an empty split wrote a sum"]
        v = self.valid
        scores = self.q @ self.k[:v].T  # [h, t]
        p = np.exp(scores - scores.max(1, keepdims=True))
        want = p / p.sum(1, keepdims=True) @ self.k[:v, : 2 * self.C]  # [h, 2c]
        got = np.concatenate([self.out[w][0] / self.out[w][1][:, None] for w in (0, 1)], 1)
        if not np.allclose(self.out[0][2], self.out[1][2]):
            return ["the consumers end at different row maxima"]
        return [] if np.allclose(got, want) else [f"result off by {np.abs(got - want).max():.2e}"]


def check(max_tiles: int = 8, seeds: int = 40, mutate: str = "") -> dict:
    """{(tiles, seed): problems} for every split that failed."""
    failures = {}
    for n in range(max_tiles + 1):
        for seed in range(seeds):
            if problems := Split(n, seed, mutate=mutate).run():
                failures[(n, seed)] = problems
    return failures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiles", type=int, default=8)
    p.add_argument("--seeds", type=int, default=40)
    p.add_argument("--mutate", choices=["late_release", "unscaled_p"], default="")
    args = p.parse_args(argv)
    failures = check(args.tiles, args.seeds, args.mutate)
    for (n, seed), problems in list(failures.items())[:10]:
        print(f"{n} tiles, seed {seed}: {'; '.join(problems)}")
    print(f"{len(failures)} failures of {(args.tiles + 1) * args.seeds} splits")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
