"""Hostile image and folder inputs through the command line: each case is built in a temporary folder,
run with ``fastdmtg train`` / ``fastdmtg predict`` (subprocesses, one thread), and judged on its exit
code, whether a traceback appeared, its message, and — for the inputs that must work — whether the
result is right (pixel values by hand, predictions equal to those of an 8-bit copy).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/hostile_inputs.py --work runs/hostile \\
        [--report benchmarks/results/cpu_2026-12-07_hostile_inputs.md] [--repo PATH]

``--repo``: the checkout whose ``fastdmtg`` runs (default: this one) — to run the same table on an
older commit. Verdicts: ``ok``; ``silent-wrong`` (exit 0 with a wrong result, or an input accepted
that must be refused); ``traceback``; ``unexpected`` (another exit code or message).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parents[1]
TINY = ["--quiet", "--set", "data.image_size=16", "--set", "model.width=2", "--set", "train.epochs=1",
        "--set", "train.batch_size=4", "--set", "train.eval_batch_size=4"]
V16 = np.array([[0, 255, 256, 32768], [32767, 65280, 65535, 4660]], dtype=np.uint16)


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(path: Path, side: int = 20000) -> Path:
    """A PNG whose header says side² 8-bit gray pixels (a token of pixel data: the header decides)."""
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * (side + 1))) + chunk(b"IEND", b""))
    return path


def png48(path: Path, v16: np.ndarray) -> Path:
    h, w = v16.shape
    rgb = np.repeat(v16[:, :, None], 3, axis=2).astype(">u2")
    raw = b"".join(b"\0" + rgb[i].tobytes() for i in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def folder(root: Path, rows: list[list[str]] | None = None, seed: int = 0) -> Path:
    """A small valid folder: binary `a`, regression `r`; 6 train, 2 val, 2 test random 16x16 PNGs."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    if rows is None:
        rows = [[f"{i}.png", "train" if i < 6 else ("val" if i < 8 else "test"), "xy"[i % 2], f"{i + 0.5}"]
                for i in range(10)]
    for r in rows:
        p = root / r[0]
        if r[0].startswith(("/", "..")) or p.exists():
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(p)
    (root / "labels.csv").write_text("image,split,a,r\n" + "".join(",".join(r) + "\n" for r in rows))
    return root


class Runner:
    def __init__(self, repo: Path, work: Path):
        self.repo, self.work = repo, work
        self.env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
        self.rows: list[dict] = []

    def cli(self, *args) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fastdmtg", *map(str, args)], capture_output=True, text=True,
                              cwd=self.repo, env=self.env, timeout=600)

    def train(self, root: Path, name: str) -> subprocess.CompletedProcess:
        return self.cli("train", "--data-root", root, "--out", self.work / "runs" / name,
                        "--set", f"data.cache_dir={self.work / 'cache' / name}", *TINY)

    def record(self, case: str, expected: str, p: subprocess.CompletedProcess, *, code: int,
               pattern: str | None = None, check: bool | None = None, note: str = "") -> None:
        """``code``/``pattern``: the exit code and a regex the message must match; ``check``: whether
        the result is right (for inputs that must work)."""
        tb = "Traceback" in p.stderr
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        msg = next((ln for ln in lines if ln.startswith("error")), lines[-1] if lines else "")
        if pattern and p.returncode == 0:
            msg = next((ln for ln in lines if re.search(pattern, ln)), msg)
        if tb:
            verdict = "traceback"
        elif p.returncode == 0 and (code != 0 or check is False):
            verdict = "silent-wrong"
        elif p.returncode != code or (pattern and not re.search(pattern, p.stderr)):
            verdict = "unexpected"
        else:
            verdict = "ok"
        msg = msg.replace(str(self.work), "WORK")[:240]               # no machine paths in the table
        self.rows.append(dict(case=case, expected=expected, code=p.returncode, tb=tb, msg=msg, verdict=verdict,
                              note=note))
        print(f"{verdict:12s} exit {p.returncode}  {case}: {msg}", file=sys.stderr)


def run(r: Runner) -> None:
    from PIL import Image
    w = r.work
    # a finished run to predict with
    base = folder(w / "base")
    p = r.train(base, "base")
    if p.returncode != 0:
        raise SystemExit(f"the base run failed:\n{p.stderr}")
    run_dir = w / "runs" / "base"
    imgs = w / "imgs"
    imgs.mkdir()

    # 1. bit depth --------------------------------------------------------------------------------
    Image.fromarray(np.tile(V16, (4, 2))).save(imgs / "g16.png")                     # (8, 8) 16-bit gray
    Image.fromarray(np.repeat((np.tile(V16, (4, 2)) >> 8).astype(np.uint8)[:, :, None], 3, 2)).save(imgs / "g8.png")
    png48(imgs / "rgb48.png", np.tile(V16, (4, 2)))
    p16, p8, p48 = (r.cli("predict", run_dir, imgs / n) for n in ("g16.png", "g8.png", "rgb48.png"))
    same = lambda a, b: a.stdout.splitlines()[1:] and [x.split(",", 1)[1] for x in a.stdout.splitlines()[1:]] == \
        [x.split(",", 1)[1] for x in b.stdout.splitlines()[1:]]
    r.record("predict: 16-bit grayscale PNG", "exit 0, the predictions of its 8-bit copy (v >> 8)", p16, code=0,
             check=bool(same(p16, p8)), note="equal to the 8-bit copy's" if same(p16, p8) else "differs from the 8-bit copy's")
    r.record("predict: 48-bit RGB PNG", "exit 0, the predictions of its 8-bit copy", p48, code=0,
             check=bool(same(p48, p8)), note="equal to the 8-bit copy's" if same(p48, p8) else "differs")
    for mode in ("I", "F"):
        a = (np.tile(V16, (4, 2)).astype(np.int32) if mode == "I" else np.tile(V16, (4, 2)).astype(np.float32) / 65535)
        Image.fromarray(a, mode).save(imgs / f"t32{mode}.tif")
        r.record(f"predict: 32-bit TIFF (mode {mode})", "exit 2, one line naming the file",
                 r.cli("predict", run_dir, imgs / f"t32{mode}.tif"), code=2, pattern=r"t32.*no defined 8-bit range")
    d = folder(w / "f16")
    Image.fromarray(np.tile(V16, (8, 4))).save(d / "1.png")
    # the values the run decoded: read back through the reader the run used (a new process)
    chk = subprocess.run([sys.executable, "-c", "import sys,numpy as np; from fastdmtg.data.folder import load_image;"
                          f"x=load_image(sys.argv[1],16); print(x[0,0,:4].tolist())", str(d / "1.png")],
                         capture_output=True, text=True, cwd=r.repo, env=r.env)
    pt = r.train(d, "f16")
    vals = chk.stdout.strip()
    r.record("train: a 16-bit PNG in the folder", "exit 0; pixels 0, 255, 256, 32768 → 0, 0, 1, 128", pt, code=0,
             check=vals == "[0, 0, 1, 128]", note=f"decoded row: {vals or chk.stderr.strip()[-80:]}")
    d = folder(w / "f32")
    Image.fromarray(np.tile(V16, (8, 4)).astype(np.int32) * 3, "I").save(d / "1.tif")
    (d / "labels.csv").write_text((d / "labels.csv").read_text().replace("1.png", "1.tif"))
    r.record("train: a 32-bit TIFF in the folder", "exit 2, one line naming the row and file", r.train(d, "f32"),
             code=2, pattern=r"labels\.csv:3:1: image .*1\.tif: integer pixels")

    # 2. overlap ----------------------------------------------------------------------------------
    d = folder(w / "overlap_path")
    (d / "labels.csv").write_text((d / "labels.csv").read_text() + "1.png,test,x,9\n")
    r.record("train: a test row naming a training image", "exit 2 naming both rows", r.train(d, "ov1"), code=2,
             pattern=r"labels\.csv:12:1 .*'1\.png' \(test\) is also listed at line 3 \(train\)")
    d = folder(w / "overlap_bytes")
    shutil.copy(d / "2.png", d / "copy.png")
    (d / "labels.csv").write_text((d / "labels.csv").read_text() + "copy.png,val,x,9\n")
    r.record("train: the same bytes under another path in val", "exit 2 naming both rows", r.train(d, "ov2"),
             code=2, pattern=r"'copy\.png' \(val\) has the same bytes as '2\.png' at line 4 \(train\)")
    d = folder(w / "overlap_link")
    os.symlink("3.png", d / "alias.png")
    (d / "labels.csv").write_text((d / "labels.csv").read_text() + "alias.png,test,x,9\n")
    r.record("train: a symlink in test to a training image", "exit 2 naming both rows", r.train(d, "ov3"), code=2,
             pattern=r"'alias\.png' \(test\) is the same file as '3\.png' at line 5 \(train\)")
    d = folder(w / "dup")
    (d / "labels.csv").write_text((d / "labels.csv").read_text() + "0.png,train,y,9\n0.png,train,x,9\n")
    r.record("train: the same image 3 times in train", "exit 0, a warning with counts", r.train(d, "dup"), code=0,
             pattern=r"2 duplicate rows in the train split \(1 image listed more than once")

    # 3. paths ------------------------------------------------------------------------------------
    out = w / "outside"
    out.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(out / "x.png")
    for name, cell in (("../outside/x.png", "../outside/x.png"), ("an absolute path", str(out / "x.png")),
                       ("/etc/passwd", "/etc/passwd")):
        d = folder(w / f"path{len(r.rows)}")
        (d / "labels.csv").write_text((d / "labels.csv").read_text() + f"{cell},test,x,9\n")
        r.record(f"train: image path {name}", "exit 2 naming the cell, the file not opened",
                 r.train(d, f"path{len(r.rows)}"), code=2, pattern=r"labels\.csv:12:1 .*is outside the dataset folder")
    d = folder(w / "symlink_out")
    os.symlink(out, d / "linked")
    (d / "labels.csv").write_text((d / "labels.csv").read_text() + "linked/x.png,test,x,9\n")
    r.record("train: a symlink inside DIR pointing out", "exit 0 (policy: followed)", r.train(d, "symlink"), code=0)

    # 4. defects ----------------------------------------------------------------------------------
    d = folder(w / "bomb")
    bomb_png(d / "1.png")
    r.record("train: a 20000² PNG (decompression bomb)", "exit 2, one line naming the file", r.train(d, "bomb"),
             code=2, pattern=r"1\.png: image too large \(400,000,000 pixels\)")
    r.record("predict: a 20000² PNG", "exit 2, one line naming the file",
             r.cli("predict", run_dir, bomb_png(imgs / "bomb.png")), code=2, pattern=r"bomb\.png: image too large")
    d = folder(w / "overflow")
    (d / "labels.csv").write_text((d / "labels.csv").read_text().replace("2.5\n", "1e39\n", 1))
    r.record("train: a label 1e39 (overflows float32)", "exit 2 naming the cell", r.train(d, "overflow"), code=2,
             pattern=r"labels\.csv:4:4: task 'r' is regression: '1e39' overflows float32")
    rows = [[f"{i}.png", "train" if i < 6 else ("val" if i < 8 else "test"), "xy"[i % 2], str(i % 3)] for i in range(10)]
    rows[3][3] = "-1"
    d = folder(w / "minus1", rows)
    r.record("train: one -1 in a 0..2 class column", "exit 0; the printed types name '-1' and its cell",
             r.train(d, "minus1"), code=0, pattern=r"r: regression, .*inferred: '-1' at \S*labels\.csv:5:4 is not a class id")
    d = folder(w / "quote")
    lines = (d / "labels.csv").read_text().splitlines()
    lines[2] = lines[2].replace(",train,", ',"train,')                 # line 3 opens a quote never closed
    (d / "labels.csv").write_text("\n".join(lines) + "\n")
    r.record("train: an unterminated quote on line 3 of 11", "exit 2 naming line 3", r.train(d, "quote"), code=2,
             pattern=r"labels\.csv:3:\d+: malformed CSV \(a quoted field opens here")
    (w / "outdir").mkdir()
    r.record("predict --out EXISTING_DIR", "exit 2, one line", r.cli("predict", run_dir, imgs / "g8.png", "--out",
                                                                      w / "outdir"), code=2,
             pattern=r"--out .*outdir: is a folder")
    pf = r.cli("predict", run_dir, str(imgs) + "/")
    n_img = len([ln for ln in pf.stdout.splitlines()[1:] if ln])
    r.record("predict DIR/ holding a 20000² PNG", "exit 2 naming that image, nothing printed", pf, code=2,
             pattern=r"bomb\.png: image too large", check=n_img == 0)
    (imgs / "bomb.png").unlink()
    for f in imgs.glob("t32*.tif"):
        f.unlink()
    pf = r.cli("predict", run_dir, str(imgs) + "/")
    n_img = len([ln for ln in pf.stdout.splitlines()[1:] if ln])
    r.record("predict DIR/ (8- and 16-bit images)", "exit 0, one row per image, sorted", pf, code=0,
             check=n_img == 3, note=f"{n_img} rows")
    (w / "empty").mkdir()
    r.record("predict EMPTY_DIR/", "exit 2, one line", r.cli("predict", run_dir, w / "empty"), code=2,
             pattern=r"a folder without image files")
    run_resume_cases(r)


def run_resume_cases(r: Runner) -> None:
    """The run / resume half: changed data on --resume and eval, a content change that keeps size and
    mtime, start-up errors (learning rate, config file, cache folder)."""
    import json
    w = r.work
    d = folder(w / "resume_data")
    name = "resume_data"
    base = ["--set", f"data.cache_dir={w / 'cache' / name}", "--quiet", "--set", "data.image_size=16",
            "--set", "model.width=2", "--set", "train.batch_size=4", "--set", "train.eval_batch_size=4"]
    run_dir = w / "runs" / name
    p = r.cli("train", "--data-root", d, "--out", run_dir, "--set", "train.epochs=1", *base)
    if p.returncode != 0:
        raise SystemExit(f"the resume case's first run failed:\n{p.stderr}")
    (d / "labels.csv").write_text((d / "labels.csv").read_text().replace(",x,", ",y,", 1))
    r.record("resume: labels.csv changed since the run started", "exit 2 naming labels.csv, nothing trained",
             r.cli("train", "--resume", run_dir, "--set", "train.epochs=2"), code=2,
             pattern=r"the data changed since the run recorded it \(labels\.csv: ")
    r.record("eval: labels.csv changed since the run", "exit 2 naming labels.csv",
             r.cli("eval", run_dir), code=2, pattern=r"the data changed since the run recorded it \(labels\.csv: ")
    p = r.cli("train", "--resume", run_dir, "--set", "train.epochs=2", "--accept-data-change")
    try:
        ch = json.loads((run_dir / "results.json").read_text()).get("config_changes", [])
        rec = any(c.get("field") == "data: labels.csv" for c in ch)
    except (OSError, ValueError):
        rec = False
    r.record("resume --accept-data-change", "exit 0, the change recorded in results.json", p, code=0, check=rec,
             note="recorded as config_changes 'data: labels.csv'" if rec else "not recorded")
    # new bytes, same size and mtime (cp -p / rsync -a of new images): the decode cache must not serve old pixels
    from PIL import Image
    d = folder(w / "cache_bytes")
    p1 = r.cli("train", "--data-root", d, "--out", w / "runs" / "cb1", "--set", "train.epochs=1", *base[2:],
               "--set", f"data.cache_dir={w / 'cache' / 'cb'}")
    img = d / "9.png"                                         # a test image
    st = img.stat()
    a = np.asarray(Image.open(img)).copy()
    a[..., 0] = 255 - a[..., 0]
    Image.fromarray(a).save(img)
    if img.stat().st_size == st.st_size:
        os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
        same = "same size and mtime"
    else:                                                     # PNG sizes differ: the stat key alone then moves
        same = "other size"
    p2 = r.cli("train", "--data-root", d, "--out", w / "runs" / "cb2", "--set", "train.epochs=1", *base[2:],
               "--set", f"data.cache_dir={w / 'cache' / 'cb'}", "--log-level", "INFO")
    redecoded = "decoding it again" in (p2.stdout + p2.stderr) or "other bytes" in (p2.stdout + p2.stderr)
    r.record(f"train: an image's bytes changed ({same}), cache kept", "exit 0, that image decoded again", p2,
             code=0, check=p1.returncode == 0 and redecoded, note="decoded again" if redecoded else "old pixels served")
    # start-up errors
    r.record("train: optim.lr=1e38", "exit 2, one line (the bound)", r.cli("train", "--out", w / "runs" / "lr",
             "--set", "optim.lr=1e38", *TINY), code=2, pattern=r"optim\.lr")
    cfgf = w / "dup.json"
    cfgf.write_text('{"train": {"epochs": 1, "epochs": 2}}')
    r.record("--config with a duplicate key", "exit 2 naming the key and the file",
             r.cli("train", "--config", cfgf, "--out", w / "runs" / "dup", *TINY), code=2, pattern=r"train\.epochs")
    blocker = w / "blocker"
    blocker.write_text("a file")
    out = w / "runs" / "cachedir"
    p = r.cli("train", "--data-root", folder(w / "cachedir"), "--out", out, *TINY,
              "--set", f"data.cache_dir={blocker / 'cache'}")
    log = (out / "train.log").read_text() if (out / "train.log").exists() else ""
    r.record("train: data.cache_dir not creatable", "exit 2 naming the setting; train.log says why", p, code=2,
             pattern=r"error: data\.cache_dir: ", note="train.log says why" if "data.cache_dir" in log else
             "train.log empty")


def overlap_cost(work: Path, repo: Path) -> str:
    """Seconds to check the demo folder (1,500 PNGs) for split overlap, and to hash every file (the
    worst case: all files of one size)."""
    code = ("import sys,time,os; from pathlib import Path; from fastdmtg.data.folder import write_demo, LabelTable,"
            " check_overlap, SPLITS, _digest;"
            "root=write_demo(Path(sys.argv[1])).resolve();"
            "sizes={os.stat(p).st_size for p in (root/'im').iterdir()};"
            "t=LabelTable(root/'labels.csv'); s=t.col['split'];"
            "rows={k:[(ln,c) for ln,c in t.rows if c[s]==k] for k in SPLITS};"
            "t0=time.perf_counter(); check_overlap(t, root, rows); dt=time.perf_counter()-t0;"
            "t0=time.perf_counter(); [_digest(str(p)) for p in (root/'im').iterdir()]; dh=time.perf_counter()-t0;"
            "print(len(t.rows), len(sizes), f'{dt:.3f}', f'{dh:.3f}', sum(os.stat(p).st_size for p in (root/'im').iterdir()))")
    p = subprocess.run([sys.executable, "-c", code, str(work / "demo")], capture_output=True, text=True, cwd=repo,
                       env=dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1"))
    if p.returncode != 0:
        return f"overlap check not measured: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}"
    n, nsizes, dt, dh, nbytes = p.stdout.split()
    return (f"Overlap check on the demo folder (`write_demo`: {n} rows, {int(nbytes) / 1e6:.1f} MB of PNGs in "
            f"{nsizes} distinct file sizes, most of them shared by two splits, so most files are hashed): "
            f"{float(dt) * 1000:.0f} ms once per open; hashing every file (blake2b; the worst case, all files of "
            f"one size) {float(dh) * 1000:.0f} ms, i.e. {float(dh) * 1000 / int(n):.2f} ms per file from the page "
            "cache (small files: the open and read calls, not the bytes, cost).")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="runs/hostile", help="scratch folder (emptied first)")
    ap.add_argument("--report", help="write the markdown table here")
    ap.add_argument("--repo", default=str(HERE), help="the checkout whose fastdmtg runs")
    a = ap.parse_args(argv)
    work = Path(a.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    r = Runner(Path(a.repo).resolve(), work)
    t0 = time.time()
    run(r)
    cost = overlap_cost(work, r.repo)
    counts = {v: sum(x["verdict"] == v for x in r.rows) for v in ("ok", "silent-wrong", "traceback", "unexpected")}
    lines = ["| case | expected | observed: exit, traceback | message (first error line, or the matching line) | verdict |",
             "|---|---|---|---|---|"]
    for x in r.rows:
        msg = x["msg"].replace("|", "\\|") + (f" ({x['note']})" if x["note"] else "")
        lines.append(f"| {x['case']} | {x['expected']} | {x['code']}, {'yes' if x['tb'] else 'no'} | `{msg}` | "
                     f"{x['verdict']} |")
    table = "\n".join(lines)
    summary = (f"{len(r.rows)} cases: {counts['ok']} ok, {counts['silent-wrong']} silent-wrong, {counts['traceback']} "
               f"tracebacks, {counts['unexpected']} unexpected ({time.time() - t0:.0f} s)")
    print(table)
    print(summary)
    print(cost)
    if a.report:
        commit = subprocess.run(["git", "-C", str(r.repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or "unknown"
        head = (f"# Hostile inputs (images, folders, runs and resumes) — CPU, {time.strftime('%Y-%m-%d')}, commit {commit}\n\n"
                "`OMP_NUM_THREADS=1 python benchmarks/hostile_inputs.py --work runs/hostile --report ...` "
                "(each case built in a scratch folder WORK and run through the command line; verdicts: ok, "
                "silent-wrong, traceback, unexpected).\n\n")
        Path(a.report).write_text(head + table + "\n\n" + summary + "\n\n" + cost + "\n")
    return 0 if counts["ok"] == len(r.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
