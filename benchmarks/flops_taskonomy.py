"""FLOPs of the Taskonomy-5 DMTG training networks (all K·N heads), beside the paper's figures: the
table of ``fastdmtg.flops.taskonomy_table`` (also ``fastdmtg bench flops --taskonomy``).

    .venv/bin/python benchmarks/flops_taskonomy.py [--size 256] [--out benchmarks/results/flops_taskonomy.md]
"""
from fastdmtg.flops import taskonomy_table

if __name__ == "__main__":
    raise SystemExit(taskonomy_table())
