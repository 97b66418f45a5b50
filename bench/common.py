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


def run_sides(script, args, keys):
    """Run `script --impl X` for minicontrol then diffusers, each in a fresh process, args.rounds times in turn (so
    that a slow spell on a shared machine falls on both sides); return each side's fastest JSON row, with every
    round's time under "rounds", and outputs (saved by each side as a tensor file)."""
    import torch
    rows, outs, rounds = {}, {}, {"minicontrol": [], "diffusers": []}
    for _ in range(args.rounds):
        for impl in rounds:
            out = f"/tmp/bench_{os.path.basename(script)}_{impl}.pt"
            row = side_row([script, "--impl", impl, "--out", out] + [f"--{k}={getattr(args, k)}" for k in keys])
            rounds[impl].append(row["seconds"])
            if impl not in rows or row["seconds"] < rows[impl]["seconds"]:
                rows[impl] = row
            outs[impl] = torch.load(out, weights_only=True)
    for impl, times in rounds.items():
        rows[impl]["rounds"] = times
    return rows, outs


def side_row(argv):
    """Run `python argv...` in a fresh process; its last line of output, a JSON row."""
    import json
    import subprocess
    import sys
    res = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def print_table(title, rows, note):
    print(title)
    print("| impl | time (s) | peak memory added (MiB) |")
    print("|---|---:|---:|")
    for impl, r in rows.items():
        print(f"| {impl} | {r['seconds']:.2f} | {r['peak_extra_mb']:.0f} |")
    m, d = rows["minicontrol"], rows["diffusers"]
    if len(m["rounds"]) > 1:
        ratios = ", ".join(f"{a / b:.3f}" for a, b in zip(m["rounds"], d["rounds"]))
        print(f"each round's time ratio: {ratios}")
    print(f"ratio minicontrol/diffusers: time {m['seconds'] / d['seconds']:.3f}, memory "
          f"{m['peak_extra_mb'] / max(d['peak_extra_mb'], 1e-9):.3f}; {note}")


def compare(script, side, title, note, **defaults):
    """A benchmark's main: in a side process (--impl given) run `side(args)`; otherwise run both sides and print the
    table, titled title(args), with note(args, outputs) after the ratios."""
    args, keys = parse_args(**defaults)
    if args.impl:
        return side(args)
    rows, outs = run_sides(script, args, keys)
    print_table(title(args), rows, note(args, outs))


def parse_args(**defaults):
    """Integer options with these defaults, plus --threads, and --impl/--out for the side processes; returns the
    arguments and the option names that the side processes get."""
    import argparse

    import torch
    p = argparse.ArgumentParser()
    for name, value in defaults.items():
        p.add_argument(f"--{name}", type=int, default=value)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=1, help="both sides this many times in turn, the best of each kept")
    p.add_argument("--impl")
    p.add_argument("--out")
    return p.parse_args(), tuple(defaults) + ("threads",)


def measure(impl, fn, repeats, out_path):
    """Memory added by the first call (what a fresh process needs), then the best time of `repeats` calls (repeats 0:
    the first call's time, warm-up included, for runs too long to repeat); saves the last output for the comparison
    and prints this side's JSON row."""
    import json
    import time

    import torch
    with torch.inference_mode():
        start = time.perf_counter()
        with PeakRSS() as mem:
            out = fn()
        times = [time.perf_counter() - start]
        if repeats:
            times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
    torch.save(out if torch.is_tensor(out) else torch.from_numpy(out.copy()), out_path)
    print(json.dumps({"impl": impl, "seconds": min(times), "peak_extra_mb": mem.extra / 2 ** 20}))
