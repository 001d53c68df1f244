# A/B of the raw ce_ignore kernels: v1 (before 2026-11-24) vs the current fastdmtg.kernels, same GPU, same run.
import importlib.util, sys, torch, triton.testing
from fastdmtg.kernels import head_loss as new
spec = importlib.util.spec_from_file_location("hl_v1", sys.path[0] + "/hl_v1.py")
old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
old.CONFIG.update(seg_block_hw=512, seg_warps=8)

def graph_us(fn):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3): fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g): fn()
    return triton.testing.do_bench(g.replay, warmup=25, rep=100, return_mode="median") * 1e3

torch.manual_seed(0)
for K, B in ((5, 32), (3, 24)):
    x = torch.randn(K, B, 18, 256, 256, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, 18, (B, 256, 256), device="cuda")
    z = torch.softmax(torch.randn(K, device="cuda"), 0)
    g = torch.tensor(1.3, device="cuda")
    xb, tb = x.numel() * 2, t.numel() * 8
    out = {}
    for name, m in (("v1", old), ("new", new)):
        tot, L, cnt = m.ce_ignore_fwd(x, t, z, 0)
        dx, dz = m.ce_ignore_bwd(g, x, t, z, L, cnt, 0)
        out[name] = (tot, L, cnt, dx, dz)
        f = graph_us(lambda: m.ce_ignore_fwd(x, t, z, 0))
        f2 = graph_us(lambda: m.ce_ignore_fwd(x, t, z, 0))
        b = graph_us(lambda: m.ce_ignore_bwd(g, x, t, z, L, cnt, 0))
        b2 = graph_us(lambda: m.ce_ignore_bwd(g, x, t, z, L, cnt, 0))
        print(f"AB K={K} B={B} {name:3s}: fwd {f:7.1f} / {f2:7.1f} us ({(xb + tb) / f / 1e3:5.0f} GB/s)  "
              f"bwd {b:7.1f} / {b2:7.1f} us ({(2 * xb + tb) / b / 1e3:5.0f} GB/s)  sum {f + b:7.1f} us "
              f"({(3 * xb + 2 * tb) / (f + b) / 1e3:5.0f} GB/s)", flush=True)
    a, r = out["new"], out["v1"]
    rel = lambda p, q: ((p.double() - q.double()).norm() / q.double().norm()).item()
    print(f"AB K={K} B={B} new vs v1 rel err: total {rel(a[0], r[0]):.1e} L {rel(a[1], r[1]):.1e} "
          f"cnt {rel(a[2], r[2]):.1e} dx {rel(a[3], r[3]):.1e} dz {rel(a[4], r[4]):.1e}", flush=True)
    del x, t, out
    torch.cuda.empty_cache()
