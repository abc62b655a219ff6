#!/usr/bin/env python3
"""Helper for benches/run.sh (Python 3 standard library only).

Subcommands:
  gen FILE MIB             write MIB MiB of test data (see docs/performance.md)
  fio JSON DIR KIND        print one number from fio's --output-format=json:
                           DIR read|write, KIND bw (MiB/s) or iops
  pid MOUNTPOINT           read `vdiskfs list --json` on stdin, print the daemon pid
  record FILE key=value…   append one JSON record to FILE (values that parse
                           as numbers are stored as numbers)
  report OUTDIR            read OUTDIR/runs.jsonl, write OUTDIR/summary.json,
                           OUTDIR/table.txt and OUTDIR/table.md, print the table
"""

import json
import os
import statistics
import sys

MIB = 1 << 20


def gen(path, mib):
    """Every 4 KiB block: 2 KiB from os.urandom, then 2 KiB of a repeating
    short pattern. No 4 KiB block is all zeros (qemu-img keeps every cluster
    allocated), and each 64 KiB cluster deflates to a bit over half its size,
    so `qemu-img convert -c` and streamOptimized VMDK really store compressed
    clusters (pure random data would be stored uncompressed)."""
    filler = (b"vdiskfs-bench-" * 147)[:2048]
    with open(path, "wb") as f:
        for _ in range(mib):
            r = os.urandom(512 * 1024)
            parts = []
            for i in range(256):
                parts.append(r[i * 2048:(i + 1) * 2048])
                parts.append(filler)
            f.write(b"".join(parts))


def fio_value(path, direction, kind):
    with open(path) as f:
        text = f.read()
    # fio may print warnings before the JSON document.
    start = text.find("{")
    doc = json.loads(text[start:])
    job = doc["jobs"][0][direction]
    if kind == "bw":
        return job["bw_bytes"] / MIB
    return job["iops"]


def pid_of(mountpoint):
    mp = os.path.realpath(mountpoint)
    for e in json.load(sys.stdin):
        if os.path.realpath(str(e.get("mountpoint", ""))) == mp and e.get("pid"):
            return e["pid"]
    return None


def transport_of(mountpoint):
    mp = os.path.realpath(mountpoint)
    for e in json.load(sys.stdin):
        if os.path.realpath(str(e.get("mountpoint", ""))) == mp:
            return e.get("transport")
    return None


def record(path, pairs):
    rec = {}
    for p in pairs:
        k, _, v = p.partition("=")
        try:
            rec[k] = int(v)
        except ValueError:
            try:
                rec[k] = float(v)
            except ValueError:
                rec[k] = v
    with open(path, "a") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")


# Targets: (workload predicate, image predicate, against, minimum ratio).
SEQ = ("seqread-psync", "seqread-aio16")
PLAIN = ("qcow2", "vmdk-sparse", "vhd-dynamic", "vhdx")
COMPRESSED = ("qcow2-comp", "vmdk-stream")
TARGETS = [
    (lambda w: w in SEQ, lambda i: i in PLAIN, "qsd", 1.5),
    (lambda w: w in SEQ, lambda i: i in PLAIN, "rawfile", 0.7),
    (lambda w: w in SEQ, lambda i: i in COMPRESSED, "qsd", 2.0),
    (lambda w: w == "randread-qd32", lambda i: True, "qsd", 3.0),
    (lambda w: w == "randread-qd1", lambda i: True, "qsd", 1.2),
    (lambda w: w == "seqwrite-1m", lambda i: True, "qsd", 1.5),
    (lambda w: w == "randwrite-4k", lambda i: True, "qsd", 1.5),
    (lambda w: w in ("seqwrite-1m-buf", "randwrite-4k-buf"), lambda i: True, "qsd", 1.5),
    (lambda w: not w.startswith(("seqwrite", "randwrite")), lambda i: i == "raw", "rawfile", 0.9),
    # Transport only (issue 15): the raw file served by the daemon, both in the page cache.
    (lambda w: w == "randread-qd32", lambda i: i == "raw-cached", "rawfile", 0.5),
]

WORKLOAD_ORDER = [
    "seqread-psync", "seqread-aio16", "randread-qd1", "randread-qd32",
    "sha256sum", "qemu-img-convert", "seqwrite-1m", "randwrite-4k", "seqwrite-1m-buf",
    "randwrite-4k-buf",
]
IMAGE_ORDER = [
    "raw", "raw-cached", "qcow2", "vmdk-sparse", "vmdk-stream", "qcow2-comp", "chain", "vhd-dynamic", "vhdx",
    "qcow2-rw", "qcow2-overlay",
]


def order(seq, key):
    return sorted(seq, key=lambda x: (seq_index(key, x), x))


def seq_index(key, x):
    return key.index(x) if x in key else len(key)


def fmt_val(v, unit):
    if v is None:
        return "-"
    if unit == "IOPS":
        return f"{v:,.0f}"
    return f"{v:,.1f}"


def paired_ratio(runs, workload, image, other_image, other="qsd", mine_target="vdiskfs"):
    """MINE/OTHER per round (rounds where both ran) and their geometric mean."""
    def by_round(image, target):
        return {r["round"]: r["value"] for r in runs
                if r["workload"] == workload and r["image"] == image
                and r["target"] == target and r["status"] == "ok" and r["value"] > 0}
    mine, theirs = by_round(image, mine_target), by_round(other_image, other)
    per_round = {k: mine[k] / theirs[k] for k in sorted(mine) if k in theirs}
    if not per_round:
        return None, {}
    return statistics.geometric_mean(per_round.values()), per_round


def report(outdir):
    runs = []
    with open(os.path.join(outdir, "runs.jsonl")) as f:
        for line in f:
            if line.strip():
                runs.append(json.loads(line))
    meta = {}
    meta_path = os.path.join(outdir, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
    cache_mib = meta.get("cache_mib", 256)
    rss_limit_kib = (cache_mib + 64) * 1024

    # Raw-file baseline: keyed by workload only (image "-").
    def collect(workload, image, target):
        vals, notes, statuses = [], [], []
        for r in runs:
            if r["workload"] == workload and r["image"] == image and r["target"] == target:
                statuses.append(r["status"])
                if r["status"] == "ok":
                    vals.append(r["value"])
                elif r.get("note"):
                    notes.append(str(r["note"]))
        return vals, notes, statuses

    uring = any(r["target"] == "vdiskfs-uring" for r in runs)
    workloads = order({r["workload"] for r in runs}, WORKLOAD_ORDER)
    images = order({r["image"] for r in runs if r["image"] != "-"}, IMAGE_ORDER)
    rows = []
    for w in workloads:
        for img in images:
            if not any(r["workload"] == w and r["image"] == img for r in runs):
                continue
            unit = next(r["unit"] for r in runs if r["workload"] == w)
            cell = {}
            for t in ("vdiskfs", "qsd", "vdiskfs-uring"):
                vals, notes, statuses = collect(w, img, t)
                cell[t] = {
                    "median": statistics.median(vals) if vals else None,
                    "values": vals,
                    "status": "ok" if vals else ("n/a" if "n/a" in statuses else ("fail" if statuses else "missing")),
                    "note": notes[0] if notes else "",
                }
            # The transport-only row has its own raw-file runs (page cache warm).
            raw_img = img if img == "raw-cached" else "-"
            vals, notes, statuses = collect(w, raw_img, "rawfile")
            cell["rawfile"] = {
                "median": statistics.median(vals) if vals else None,
                "values": vals,
                "status": "ok" if vals else ("fail" if statuses else "missing"),
                "note": notes[0] if notes else "",
            }
            # Ratios pair the two runs of one round (minutes apart; rounds
            # are tens of minutes apart, and the disk drifts in between) and
            # take the geometric mean over the rounds: with the daemons'
            # order flipped every round, an advantage of going first or
            # second cancels out.
            ratio_q, per_round_q = paired_ratio(runs, w, img, img)
            ratio_r, per_round_r = paired_ratio(runs, w, img, raw_img, "rawfile")
            ratio_u, _ = paired_ratio(runs, w, img, img, "vdiskfs", "vdiskfs-uring")
            ratio_ur, _ = paired_ratio(runs, w, img, raw_img, "rawfile", "vdiskfs-uring")
            checks = []
            for wp, ip, against, minimum in TARGETS:
                if not (wp(w) and ip(img)):
                    continue
                ratio = ratio_q if against == "qsd" else ratio_r
                if cell["vdiskfs"]["status"] == "n/a":
                    verdict = "n/a"
                elif ratio is None:
                    verdict = "fail"
                else:
                    verdict = "pass" if ratio >= minimum else "FAIL"
                checks.append({"against": against, "min": minimum, "ratio": ratio, "verdict": verdict})
            rss = [r.get("rss_hwm_kib") for r in runs
                   if r["workload"] == w and r["image"] == img and r["target"] == "vdiskfs"
                   and isinstance(r.get("rss_hwm_kib"), int)]
            rows.append({
                "workload": w, "image": img, "unit": unit,
                "vdiskfs": cell["vdiskfs"], "qsd": cell["qsd"], "rawfile": cell["rawfile"],
                "vdiskfs-uring": cell["vdiskfs-uring"], "ratio_uring_classic": ratio_u,
                "ratio_uring_raw": ratio_ur,
                "ratio_qsd": ratio_q, "ratio_raw": ratio_r, "checks": checks,
                "ratio_qsd_per_round": per_round_q, "ratio_raw_per_round": per_round_r,
                "rss_hwm_kib_max": max(rss) if rss else None,
            })

    # Memory: one check per image, the largest VmHWM seen in any workload.
    mem = []
    for img in images:
        rss = [r["rss_hwm_kib"] for r in runs
               if r["image"] == img and r["target"] == "vdiskfs" and isinstance(r.get("rss_hwm_kib"), int)]
        if rss:
            mem.append({"image": img, "max_kib": max(rss), "limit_kib": rss_limit_kib,
                        "verdict": "pass" if max(rss) <= rss_limit_kib else "FAIL"})

    lines = []
    hdr = ("workload", "image", "unit", "vdiskfs", "qsd", "raw file", "vdk/qsd", "vdk/raw", "targets")
    if uring:
        hdr = hdr[:3] + ("vdiskfs", "uring") + hdr[4:8] + ("uring/classic", "uring/raw", "targets")
    table = []
    for row in rows:
        def show(t):
            c = row[t]
            if c["status"] == "n/a":
                return "n/a (vdiskfs: not implemented)" if t == "vdiskfs" else "n/a"
            if c["median"] is None:
                return c["status"]
            return fmt_val(c["median"], row["unit"])
        tg = []
        for c in row["checks"]:
            r = "-" if c["ratio"] is None else f"{c['ratio']:.2f}"
            tg.append(f"{c['against']}≥{c['min']}: {c['verdict']}" + ("" if c["verdict"] == "n/a" else f" ({r})"))
        def ratio(x):
            return "-" if x is None else f"{x:.2f}"
        cols = [row["workload"], row["image"], row["unit"], show("vdiskfs"), show("qsd"), show("rawfile"),
                ratio(row["ratio_qsd"]), ratio(row["ratio_raw"])]
        if uring:
            cols[4:4] = [show("vdiskfs-uring")]
            cols += [ratio(row["ratio_uring_classic"]), ratio(row["ratio_uring_raw"])]
        table.append(tuple(cols) + ("; ".join(tg) if tg else "(no target)",))
    widths = [max(len(h), *(len(t[i]) for t in table)) if table else len(h) for i, h in enumerate(hdr)]
    def line(cols):
        return "  ".join(c.ljust(widths[i]) if i in (0, 1, 2, len(hdr) - 1) else c.rjust(widths[i]) for i, c in enumerate(cols)).rstrip()
    lines.append(line(hdr))
    lines.append(line(["-" * w for w in widths]))
    for t in table:
        lines.append(line(t))
    lines.append("")
    lines.append(f"vdiskfs daemon memory (VmHWM, largest over the workloads; limit = --cache-size {cache_mib} MiB + 64 MiB):")
    for m in mem:
        lines.append(f"  {m['image']:<14} {m['max_kib'] / 1024:8.1f} MiB  (limit {m['limit_kib'] / 1024:.0f} MiB)  {m['verdict']}")
    verdicts = [c["verdict"] for row in rows for c in row["checks"]] + [m["verdict"] for m in mem]
    n_pass = verdicts.count("pass")
    n_fail = sum(1 for v in verdicts if v in ("FAIL", "fail"))
    n_na = verdicts.count("n/a")
    lines.append("")
    lines.append(f"targets: {n_pass} pass, {n_fail} fail, {n_na} n/a"
                 f"   (values: medians of {meta.get('rounds', '?')} round(s); ratios: geometric mean of"
                 f" the rounds' paired ratios; image {meta.get('size_mib', '?')} MiB; mode {meta.get('mode', '?')})")
    text = "\n".join(lines) + "\n"

    md = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for t in table:
        md.append("| " + " | ".join(t) + " |")
    md.append("")
    md.append(f"vdiskfs daemon memory (VmHWM max over workloads, limit = cache {cache_mib} MiB + 64 MiB):")
    md.append("")
    md.append("| image | VmHWM MiB | limit MiB | verdict |")
    md.append("|---|---|---|---|")
    for m in mem:
        md.append(f"| {m['image']} | {m['max_kib'] / 1024:.1f} | {m['limit_kib'] / 1024:.0f} | {m['verdict']} |")

    with open(os.path.join(outdir, "table.txt"), "w") as f:
        f.write(text)
    with open(os.path.join(outdir, "table.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    with open(os.path.join(outdir, "summary.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "memory": mem,
                   "targets": {"pass": n_pass, "fail": n_fail, "n/a": n_na}}, f, indent=1)
        f.write("\n")
    sys.stdout.write(text)


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    cmd, args = argv[1], argv[2:]
    if cmd == "gen":
        gen(args[0], int(args[1]))
    elif cmd == "fio":
        print(f"{fio_value(args[0], args[1], args[2]):.3f}")
    elif cmd == "pid":
        pid = pid_of(args[0])
        if pid is None:
            sys.exit(1)
        print(pid)
    elif cmd == "transport":
        print(transport_of(args[0]) or "")
    elif cmd == "record":
        record(args[0], args[1:])
    elif cmd == "report":
        report(args[0])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
