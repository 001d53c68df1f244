"""bench/profile command behaviour (issue 15, item 8): a failed row is in the table and fails the
command; every row honours --steps/--repeats/--warmup; CPU runs report no MFU; one table each."""
import pytest

from fastdmtg import bench

SMALL = ["--set", "data.image_size=16", "--set", "model.width=2", "--set", "train.batch_size=4",
         "--set", "data.synthetic_train=64", "--set", "data.synthetic_val=16", "--set", "data.synthetic_test=16"]


def test_failed_row_is_reported_and_exits_nonzero(monkeypatch, capsys, tmp_path):
    calls = []

    def fake(cfg, device, *, steps, repeats, warmup, loader="gpu-cache", **kw):
        calls.append((loader, steps, repeats, warmup))
        if loader == "torch":
            raise ValueError("cannot decode this\nsecond line")
        return {"ms_per_step": 2.0, "img_per_s": 2000.0, "mode": "eager", "kernels": "reference",
                "data": "gpu-cache", "spread_ms": (2.0, 2.0), "loss": 1.0}
    monkeypatch.setattr(bench, "measure_step", fake)
    from fastdmtg import testing                  # the raw writer the format's BenchData calls
    monkeypatch.setattr(testing, "write_celeba_raw", lambda root, n: None)
    out = tmp_path / "r.md"
    rc = bench.step_main(["--recipe", "synthetic_k3", *SMALL, "--only", "0,1", "--steps", "7", "--repeats", "2",
                          "--warmup", "3", "--device", "cpu", "--out", str(out)])
    assert rc == 1
    stdout, err = capsys.readouterr()
    report = out.read_text()
    assert "| failed: ValueError: cannot decode this |" in report
    assert "Traceback" not in err and "failed: ValueError: cannot decode this" in err
    # every row, the reference-style one included, ran with the flags
    assert calls == [("torch", 7, 2, 3), ("gpu-cache", 7, 2, 3)]
    # CPU: says so, no MFU against a GPU peak
    assert "CPU wall clock" in report and "CUDA events" not in report and "no MFU on CPU" in report
    row = next(ln for ln in report.splitlines() if ln.startswith("| eager fp32, host-memory (CPU) uint8 cache"))
    assert row.split("|")[7].strip() == "—"
    assert stdout.count("| configuration |") == 1                          # one table on stdout


def test_all_rows_ok_exits_zero(monkeypatch, capsys):
    monkeypatch.setattr(bench, "measure_step", lambda cfg, device, **kw: {
        "ms_per_step": 1.0, "img_per_s": 4000.0, "mode": "eager", "kernels": "reference", "data": "gpu-cache",
        "spread_ms": (1.0, 1.0), "loss": 1.0})
    assert bench.step_main(["--recipe", "synthetic_k3", *SMALL, "--only", "1", "--device", "cpu"]) == 0


def test_flops_prints_one_table(capsys):
    assert bench.flops_main(["--recipes", "synthetic_k3"]) == 0
    out = capsys.readouterr().out
    assert out.count("| recipe | K | N |") == 1 and out.count("| synthetic_k3 |") == 1


@pytest.mark.parametrize("cmd", ["step", "flops"])
def test_every_flag_has_help(cmd, capsys):
    with pytest.raises(SystemExit):
        bench.bench_main([cmd, "--help"])
    text = capsys.readouterr().out
    import re
    lines = text.splitlines()
    bare = [ln.split()[0] for i, ln in enumerate(lines)              # an option line with no help after it
            if re.match(r"^  --?[a-z]", ln) and len(ln.split("  ")) <= 2 and ln.rstrip() == ln.rstrip()
            and not re.match(r"^\s{8,}\S", lines[i + 1] if i + 1 < len(lines) else "")
            and not re.search(r"\S\s{2,}\S", ln.strip())]
    assert len(re.findall(r"^  --", text, re.M)) > 3 and not bare, f"flags without help: {bare}"
