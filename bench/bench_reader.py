"""Benchmark: tvtool's safetensors row reader against safetensors' `safe_open(...).get_slice(name)[a:b]`.

Both read every tensor of a Llama-8B-shaped bf16 pair (built by bench_materialize's
`make_model`; --layers 1 gives 2.5 GB per checkpoint) in the row chunks materialize
uses (`row_chunks`, 8M elements), one fresh process per measurement, page cache
dropped first (cold) or not (warm). Each worker samples its own /proc/self/status
(VmRSS = RssAnon + RssFile + RssShmem) and /proc/self/smaps_rollup (Pss) every few
ms: RssFile is mapped file pages (page cache that the kernel can drop), RssAnon is
memory the process really owns.

    python bench/bench_reader.py --layers 1 --out bench/_work --repeat 2
Results go to stdout as a markdown table; paste them into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_materialize import drop_caches, make_model  # noqa: E402
from tvtool.io.writer import human  # noqa: E402

READERS = ("tvtool", "safe_open")


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) * 1024
    return out


def _pss() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def worker(reader: str, folders: list[Path]) -> dict:
    """Read every tensor of every shard in row chunks; returns time and peak memory figures."""
    from safetensors import safe_open

    from tvtool.io.safetensors_io import read_header, read_rows, row_chunks

    peak = {"RssAnon": 0, "RssFile": 0, "Pss": 0}
    stop = threading.Event()

    def sample():
        i = 0
        while not stop.is_set():
            s = _status()
            peak["RssAnon"] = max(peak["RssAnon"], s["RssAnon"])
            peak["RssFile"] = max(peak["RssFile"], s["RssFile"])
            if i % 5 == 0:
                peak["Pss"] = max(peak["Pss"], _pss())
            i += 1
            time.sleep(0.005)

    start_rss = _status()
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    files = [f for d in folders for f in sorted(d.glob("*.safetensors"))]
    nbytes, check = 0, 0.0
    t0 = time.perf_counter()
    for path in files:
        infos, _ = read_header(path)
        if reader == "tvtool":
            for name, info in infos.items():
                for s, e in row_chunks(info.shape):
                    chunk = read_rows(info, s, e)
                    nbytes += chunk.numel() * chunk.element_size()
                    check += float(chunk.float().sum())  # touch every byte, as materialize does
        else:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    for s, e in row_chunks(tuple(sl.get_shape())):
                        chunk = sl[s:e]
                        nbytes += chunk.numel() * chunk.element_size()
                        check += float(chunk.float().sum())  # touch every byte, as materialize does
    secs = time.perf_counter() - t0
    stop.set()
    t.join()
    end = _status()
    return {"reader": reader, "seconds": secs, "bytes": nbytes, "check": check, "VmHWM": end["VmHWM"],
            "start_rss": start_rss["VmRSS"], **peak}


def run(reader: str, folders: list[Path], cold: bool) -> dict:
    if cold:
        drop_caches()
    p = subprocess.run([sys.executable, __file__, "--worker", reader, *map(str, folders)],
                       capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=1, help="1 layer: 2.5 GB per checkpoint")
    ap.add_argument("--out", type=Path, default=Path("bench/_work"))
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], [Path(p) for p in args.worker[1:]])))
        return
    base, reasoner = args.out / f"base-{args.layers}", args.out / f"reasoner-{args.layers}"
    make_model(base, args.layers, 0)
    make_model(reasoner, args.layers, 1, base)
    folders = [base, reasoner]
    size = sum(f.stat().st_size for d in folders for f in d.glob("*.safetensors"))
    rows = []
    for cold in (True, False):
        if not cold:
            for r in READERS:  # fill the page cache once before warm runs
                run(r, folders, cold=False)
        for _ in range(args.repeat):
            for r in READERS:  # alternate, so drift on a shared machine hits both
                res = run(r, folders, cold)
                res["cache"] = "cold" if cold else "warm"
                rows.append(res)
                print(json.dumps(res), file=sys.stderr, flush=True)
    assert len({r["check"] for r in rows}) == 1 and {r["bytes"] for r in rows} == {size - _headers(folders)}, "readers disagree"
    print(f"\nPair: {args.layers} Llama-8B layer(s) + embed + lm_head per checkpoint, {human(size)} bf16 read "
          f"in 8M-element row chunks; best of {args.repeat} per cell.\n")
    print("| reader | cache | time (s) | GB/s | peak VmRSS (VmHWM) | peak RssAnon | peak RssFile | peak Pss |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    best = {}
    for cache in ("cold", "warm"):
        for r in READERS:
            cell = [x for x in rows if x["reader"] == r and x["cache"] == cache]
            b = min(cell, key=lambda x: x["seconds"])
            best[r, cache] = b
            print(f"| {r} | {cache} | {b['seconds']:.2f} | {size / b['seconds'] / 1e9:.2f} | {human(b['VmHWM'])} | "
                  f"{human(max(x['RssAnon'] for x in cell))} | {human(max(x['RssFile'] for x in cell))} | "
                  f"{human(max(x['Pss'] for x in cell))} |")
    print("\nRatios safe_open / tvtool (same run):")
    for cache in ("cold", "warm"):
        a, b = best["safe_open", cache], best["tvtool", cache]
        print(f"- {cache}: time {a['seconds'] / b['seconds']:.2f}×, peak VmRSS {a['VmHWM'] / b['VmHWM']:.2f}×, "
              f"peak RssAnon {a['RssAnon'] / max(1, b['RssAnon']):.2f}×")


def _headers(folders: list[Path]) -> int:
    from tvtool.io.safetensors_io import read_header

    total = 0
    for d in folders:
        for f in d.glob("*.safetensors"):
            infos, _ = read_header(f)
            total += f.stat().st_size - sum(i.nbytes for i in infos.values())
    return total


if __name__ == "__main__":
    main()
