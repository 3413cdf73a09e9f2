"""Kill rate per module after `mutmut run` (run by `make mutation` in build/mutation/).

usage: python mutation_report.py EQUIVALENTS_MD

Reads every mutant's status from `mutmut results --all true`, counts per module, and
checks the survivors against EQUIVALENTS_MD, whose lines name equivalent mutants as
`` `usage_agg.module.x_function__mutmut_N` ``: reason. The kill rate is killed (and
timed out) over every mutant run (survived, or reached by no test, counts against it;
an equivalent survivor too). Exits 1 when a survivor is neither killed nor listed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

KILLED = {"killed", "timeout", "caught by type check"}
NOT_RUN = {"not checked", "skipped"}


def main(equivalents_md: str) -> int:
    listed = set(re.findall(r"`(usage_agg\.[\w.]+__mutmut_\d+)`", Path(equivalents_md).read_text()))
    out = subprocess.run(["mutmut", "results", "--all", "true"], capture_output=True, text=True, check=True).stdout
    by_module: dict[str, Counter] = defaultdict(Counter)
    unexplained = []
    for line in out.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if not sep or "__mutmut_" not in name:
            continue
        module = name.split(".x_")[0].split(".xǁ")[0]
        by_module[module][status] += 1
        if status in ("survived", "no tests"):
            if name in listed:
                by_module[module]["equivalent"] += 1
            else:
                unexplained.append(name)
    total = Counter()
    print(f"{'module':28} {'mutants':>7} {'killed':>7} {'survived':>8} {'equiv.':>6} {'not run':>7} {'kill rate':>9}")
    for module in sorted(by_module):
        c = by_module[module]
        total.update(c)
        _row(module, c)
    _row("all", total)
    if unexplained:
        print(f"\n{len(unexplained)} surviving mutants neither killed nor listed in {equivalents_md}:")
        for name in unexplained:
            print("   ", name)
    return 1 if unexplained else 0


def _row(module: str, c: Counter) -> None:
    killed = sum(c[s] for s in KILLED)
    not_run = sum(c[s] for s in NOT_RUN)
    total = sum(c.values()) - c["equivalent"]
    survived = total - killed - not_run  # survived, no tests, suspicious, segfault
    rate = f"{100 * killed / (killed + survived):.1f}%" if killed + survived else "-"
    print(f"{module:28} {total:7} {killed:7} {survived:8} {c['equivalent']:6} {not_run:7} {rate:>9}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
