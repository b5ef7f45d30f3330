"""Fuzzing: hypothesis inputs into every parser of network and user input.

``python -m benchmarks fuzz [--target T] [--inputs N] [--seed S] [--jobs J]``
runs each target of :mod:`tests.fuzz.targets` (``amp``, ``frames``,
``ssh-cert``, ``ssh-key``, ``http``, ``yaml``; all by default) for ``N``
inputs (default 100,000), each target in a process of its own, ``J`` at a
time. Each hypothesis example is followed by ``--mutants`` byte-level
variants of it (default 19: generating is ~90 % of an input's cost, so the
variants make the long runs many times shorter). Hypothesis runs are
chunked (``--chunk`` inputs each, seeds ``S``, ``S+1``, ...) so its
bookkeeping of explored inputs stays small. Prints one
JSON object per target: inputs, seconds, inputs per second, crashes (an
exception other than the documented validation errors, an error logged with
a traceback, or an input using more than ``--deadline`` seconds of CPU) and
the first crash
with its shrunk input. Exits non-zero if anything crashed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent


def _worker(target: str, inputs: int, seed: int, chunk: int, deadline: float,
            mutants: int) -> dict:
    if str(_ROOT) not in sys.path:
        sys.path.insert(0, str(_ROOT))
    from tests.fuzz.runner import run_target

    done, examples, seconds, slowest, crash = 0, 0, 0.0, 0.0, None
    chunk_seed = seed
    while done < inputs and crash is None:
        report = run_target(target, inputs=min(chunk, inputs - done), seed=chunk_seed,
                            per_input_deadline=deadline, mutants=mutants)
        done += report.inputs
        examples += report.examples
        seconds += report.seconds
        slowest = max(slowest, report.slowest_input_s)
        crash = report.crash
        chunk_seed += 1
        if report.inputs == 0:
            break
    return {"benchmark": "fuzz", "target": target, "inputs": done,
            "hypothesis_examples": examples, "mutants_per_example": mutants,
            "seconds": round(seconds, 1),
            "inputs_per_s": round(done / seconds, 1) if seconds else None,
            "crashes": 0 if crash is None else 1, "slowest_input_cpu_s": round(slowest, 4),
            "seed": seed, "chunk": chunk, "deadline_s": deadline, "crash": crash}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks fuzz")
    parser.add_argument("--target", action="append", help="a target (repeatable; default all)")
    parser.add_argument("--inputs", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=5_000)
    parser.add_argument("--deadline", type=float, default=5.0,
                        help="CPU seconds one input may use before it counts as a hang")
    parser.add_argument("--mutants", type=int, default=19,
                        help="byte-level variants checked after each hypothesis example")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        (target,) = args.target
        print(json.dumps(_worker(target, args.inputs, args.seed, args.chunk, args.deadline,
                                 args.mutants)), flush=True)
        return 0

    if str(_ROOT) not in sys.path:
        sys.path.insert(0, str(_ROOT))
    from tests.fuzz.targets import TARGETS

    targets = args.target or sorted(TARGETS)
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        parser.error(f"unknown target {unknown[0]} (known: {', '.join(sorted(TARGETS))})")
    pending = list(targets)
    running: list[tuple[str, subprocess.Popen, float]] = []
    crashed = False
    while pending or running:
        while pending and len(running) < max(args.jobs, 1):
            target = pending.pop(0)
            command = [sys.executable, "-m", "benchmarks", "fuzz", "--worker", "--target", target,
                       "--inputs", str(args.inputs), "--seed", str(args.seed),
                       "--chunk", str(args.chunk), "--deadline", str(args.deadline),
                       "--mutants", str(args.mutants)]
            running.append((target, subprocess.Popen(command, cwd=_ROOT, stdout=subprocess.PIPE,
                                                     stderr=subprocess.DEVNULL, text=True),
                            time.monotonic()))
        for entry in list(running):
            target, process, started = entry
            if process.poll() is None:
                continue
            running.remove(entry)
            lines = [line for line in process.stdout.read().splitlines() if line.startswith("{")]
            if process.returncode != 0 or not lines:
                result = {"benchmark": "fuzz", "target": target, "crashes": 1,
                          "crash": f"the worker exited with status {process.returncode}"}
            else:
                result = json.loads(lines[-1])
            result["wall_s"] = round(time.monotonic() - started, 1)
            crashed = crashed or bool(result.get("crashes"))
            print(json.dumps(result), flush=True)
        time.sleep(0.2)
    return 1 if crashed else 0
