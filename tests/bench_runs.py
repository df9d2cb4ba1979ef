"""What the benchmark tests share: a quick run into a docs file, its table's rows, an interrupted run.

Behaviour only, never timing: a benchmark run writes its section in place, and every
server it starts ends with it.
"""

import json
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from sandbox import process_alive, wait_until


def table_rows(text, header):
    """The cells of every Markdown table row in ``text`` but the header row (its first cell ``header``)."""
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
            for line in text.splitlines() if line.startswith("| ") and not line.startswith(f"| {header} ")]


def quick_run_into_docs(bench, docs, start, end, *options, timeout=900):
    """Run ``bench --quick`` into ``docs``, which holds other text and a stale section between
    ``start`` and ``end``; check that only that section was replaced, once.

    :returns: ``(section, info, completed)``: the new section's text, the run's JSON, the process.
    """
    docs.write_text(f"# Benchmarks\n\nkept before\n\n{start}\nstale row\n{end}\n\nkept after\n")
    results = docs.with_suffix(".json")
    done = subprocess.run([sys.executable, str(bench), "--quick", *options, "--out", str(docs),
                           "--json", str(results)],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = docs.read_text()
    assert "kept before" in text and "kept after" in text
    assert "stale row" not in text
    assert text.count(start) == 1 and text.count(end) == 1
    return text.split(start, 1)[1].split(end, 1)[0], json.loads(results.read_text()), done


def servers_stopped(pids):
    """Wait until every process in ``{name: pid}`` has ended."""
    wait_until(lambda: not any(process_alive(pid) for pid in pids.values()), timeout=20,
               what="the benchmark's servers to end")


def interrupt_once_ready(bench):
    """Start ``bench --quick``, SIGINT it once its servers run; check it exits 130 saying so.

    :returns: ``(pids, work)``: the servers it reported (``{name: pid}``) and its work folder.
    """
    process = subprocess.Popen([sys.executable, str(bench), "--quick"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    try:
        ready = wait_until(lambda: next((line for line in lines if line.startswith("sandbox ready")), None)
                           or process.poll() is not None and "exited", timeout=300, what="the sandbox")
        assert ready != "exited", process.stderr.read()[-3000:]
        pids = json.loads(ready.split("pids ", 1)[1])
        work = Path(re.search(r"sandbox ready in (\S+):", ready).group(1))
        assert all(process_alive(pid) for pid in pids.values())
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 130
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "interrupted" in process.stderr.read()
    return pids, work
