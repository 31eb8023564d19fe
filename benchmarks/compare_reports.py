"""Which conclusions changed between two runs of the notebooks (or the grid)?

    python benchmarks/compare_reports.py reports/ /tmp/fresh-clone/reports/

Compares every ``metrics/*.json`` of the two folders (``purifylib.reports.compare_metrics``) and
prints, first, the conclusions that changed (a target met or missed, a rule that held or not, a
verdict's text, an ASR crossing 10%), then the numbers that moved beyond the tolerances (2 points
for rates, 5% otherwise), then what is in only one of them. Floats differ between processors, so
numbers moving a little is expected; a conclusion changing is what to look at.
"""

import argparse
import sys

from purifylib.reports import compare_metrics


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--rate-tol", type=float, default=0.02)
    p.add_argument("--rel-tol", type=float, default=0.05)
    a = p.parse_args(argv)
    changed = compare_metrics(a.old, a.new, rate_tol=a.rate_tol, rel_tol=a.rel_tol)
    for title, key in (("conclusions that changed", "conclusions"), ("numbers that moved", "numbers"),
                       ("in one run only", "missing")):
        print(f"{title}: {len(changed[key])}")
        for line in changed[key]:
            print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
