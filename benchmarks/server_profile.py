"""Where nats-server's time goes under one contender's load: ``perf`` on the server.

    python benchmarks/server_profile.py                  # the engine, KV workflow, c=100
    python benchmarks/server_profile.py --contender floor

Starts ``quick.py --contenders C --rounds 1`` (its own embedded nats-server), waits until
the load has run a few seconds, records the server with ``perf record -e cpu-clock -g`` for
``--seconds``, and prints the inclusive share of the server's samples that each part of its
work took (a sample counts in every part its stack passes through, so the parts overlap):
storing messages and the file writes among them, deliveries to consumers, acknowledgements
(and a work queue's removals), sourcing, the clients' sockets. RESULTS.md's figures of
where the server's time goes ("Session 9") come from here. Needs ``perf``.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (name, the frames whose samples count: any of these in the stack)
_PARTS = [
    ("storing messages", ("(*stream).processJetStreamMsg",)),
    ("  of which file writes", ("(*msgBlock).writeMsgRecord",)),
    ("delivering to consumers", ("(*consumer).loopAndGatherMsgs",)),
    ("acknowledgements (and removals)", ("(*consumer).processInboundAcks",)),
    ("  of which removals", ("(*fileStore).removeMsg",)),
    ("sourcing", ("(*stream).processAllSourceMsgs",)),
    ("clients' sockets (read and write)", ("(*client).readLoop", "(*client).writeLoop")),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contender", default="engine", help="engine, floor or peer")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--settle", type=float, default=10.0, help="seconds of load first")
    parser.add_argument("--n", type=int, default=60000, help="executions quick.py runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="reactive-server-profile-") as tmp:
        load = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "quick.py"),
                "--contenders",
                args.contender,
                "--rounds",
                "1",
                "--n",
                str(args.n),
            ],
            cwd=HERE,
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(args.settle)
        server = subprocess.run(
            ["pgrep", "-n", "-f", "nats-server"], capture_output=True, text=True
        ).stdout.split()
        if not server or load.poll() is not None:
            sys.exit("no nats-server under load to record")
        data = f"{tmp}/perf.data"
        record = ["perf", "record", "-e", "cpu-clock", "-F", "999", "-g", "-p", server[0]]
        subprocess.run(
            [*record, "-o", data, "--", "sleep", str(args.seconds)], capture_output=True, check=True
        )
        report, _ = load.communicate()
        script = subprocess.run(
            ["perf", "script", "-i", data], capture_output=True, text=True
        ).stdout
    counts: collections.Counter[str] = collections.Counter()
    samples = 0
    for stack in script.split("\n\n"):
        frames = stack.strip()
        if not frames:
            continue
        samples += 1
        for name, marks in _PARTS:
            if any(mark in frames for mark in marks):
                counts[name] += 1
    print(report.strip())
    print(f"nats-server, {samples} samples over {args.seconds} s ({args.contender}'s load):")
    for name, _ in _PARTS:
        print(f"  {100 * counts[name] / max(1, samples):5.1f} %  {name}")


if __name__ == "__main__":
    main()
