"""Every kernel benchmark in this folder, one after the other, each printing its table.

    .venv/bin/python benchmarks/kernels/run_all.py            # on a GPU: full sizes, saved under benchmarks/results/
    .venv/bin/python benchmarks/kernels/run_all.py --smoke    # tiny sizes (a CPU always runs these)

Arguments are passed on to each bench_*.py; the first that fails stops the run with its exit code.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def main() -> int:
    for script in sorted(Path(__file__).resolve().parent.glob("bench_*.py")):
        print(f"== {script.name}", flush=True)
        rc = subprocess.call([sys.executable, str(script), *sys.argv[1:]])
        if rc:
            print(f"{script.name} failed with exit code {rc}", file=sys.stderr)
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
