#!/usr/bin/env python3
"""A/B runs of bench/workloads builds, alternating them, and their comparison.

Run:      python3 bench/ab/ab.py N WORKLOADS POLICIES BIN1 [BIN2 ...] > log
          Runs each build (a `go build -o BIN ./bench/workloads` of each tree) over the
          comma-separated WORKLOADS, N rounds, one build after the other per workload, so
          that the machine's drift falls on both. models-NN and random-NN add the flags
          that draw them. Prints one line per result, then a summary.
Compare:  python3 bench/ab/ab.py compare LOG BIN_A BIN_B [POLICY]
          Per workload, the mean of each build's runs (requests/s, p99, loads per 1,000)
          and B over A; last, the geometric mean of the ratios.
"""
import collections
import math
import re
import subprocess
import sys

RESULT = re.compile(r'^(\S+)\s+(\S+)\s+([\d.]+) req/s p50 (\S+)\s+p99 (\S+)\s+loads/1k (\d+)')


def seconds(s):
    for suffix, scale in (('µs', 1e-6), ('ms', 1e-3), ('s', 1)):
        if s.endswith(suffix):
            return float(s[:-len(suffix)]) * scale
    return float(s)


def drawn(workloads, prefix):
    return [int(w.split('-')[1]) for w in workloads
            if w.startswith(prefix) and w.split('-')[1].isdigit()]


def run(n, workloads, policies, builds):
    names = workloads.split(',')
    extra = []
    if m := drawn(names, 'models-'):
        extra += ['-random-models', str(max(m))]
    if r := drawn(names, 'random-'):
        extra += ['-random', str(max(r))]
    results = collections.defaultdict(list)
    for rnd in range(n):
        for w in names:
            for b in builds:
                out = subprocess.run([b] + extra + ['-workloads', w, '-policies', policies],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True).stdout
                for line in out.splitlines():
                    if m := RESULT.match(line):
                        wl, pol, thr, _, p99, loads = m.groups()
                        results[(wl, pol, b)].append((float(thr), seconds(p99), int(loads)))
                        print(f'{rnd} {b} {wl} {pol} thr {thr} p99 {p99} loads {loads}', flush=True)
    print('=== summary')
    for (w, p, b), v in sorted(results.items()):
        print(f'{w:12} {p:12} {b:16} thr ' + ' '.join(f'{x[0]:.1f}' for x in v)
              + '  p99 ' + ' '.join(f'{x[1]:.2f}' for x in v)
              + '  loads ' + ' '.join(str(x[2]) for x in v))


def compare(log, a, b, policy='least_delay'):
    runs = collections.defaultdict(list)
    for line in open(log):
        f = line.split()
        if len(f) >= 10 and f[4] == 'thr' and f[3] == policy:
            runs[(f[2], f[1])].append((float(f[5]), seconds(f[7]), int(f[9])))
    logs = [0.0, 0.0]
    n = 0
    for w in sorted({k[0] for k in runs}):
        ra, rb = runs.get((w, a)), runs.get((w, b))
        if not ra or not rb:
            continue
        ma = [sum(x[i] for x in ra) / len(ra) for i in range(3)]
        mb = [sum(x[i] for x in rb) / len(rb) for i in range(3)]
        thr = mb[0] / ma[0]
        p99 = mb[1] / ma[1] if ma[1] else 1
        logs[0] += math.log(thr)
        logs[1] += math.log(p99)
        n += 1
        print(f'{w:14} thr {ma[0]:6.1f} -> {mb[0]:6.1f} ({thr:.2f})  p99 {ma[1]:6.2f} -> {mb[1]:6.2f}'
              f'  loads {ma[2]:5.0f} -> {mb[2]:5.0f}')
    if n:
        print(f'geomean thr {math.exp(logs[0] / n):.3f} p99 {math.exp(logs[1] / n):.3f} over {n}')


if __name__ == '__main__':
    if len(sys.argv) >= 5 and sys.argv[1] == 'compare':
        compare(*sys.argv[2:6])
    elif len(sys.argv) >= 5:
        run(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        sys.exit(__doc__)
