"""Helpers shared by the benchmarks: peak resident memory of a block, run in its own subprocess per side."""
import ctypes
import gc
import os
import threading
import time


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Highest resident set size above the level at entry, sampled every 2 ms in a thread."""

    def __enter__(self):
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)          # hand freed heap back, so both sides start level
        self.base = self.peak = rss_bytes()
        self.running = True
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()
        return self

    def poll(self):
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.extra = self.peak - self.base
