#!/usr/bin/env python3
"""Summarises the block timelines of scripts/stream_gemm_timeline_patch.py's build (MAMBA3_TIMELINE=path.b<batch>).

Each line of a timeline file is one stream GEMM block of one recorded decode step: 16 numbers — %globaltimer (ns) at
0 start, 1 the producer's griddepcontrol.wait returning (the kernel before done), 2 the first stage ready, 3 thread
0's last stage multiplied, 4 the end of thread 0's epilogue rows, then 5 n | k-blocks << 32, 6 block | grid << 32,
7 SM | split << 32 | rows << 48, 8 the producer warp past its last wait, 9 the epilogue's first barrier, 10 its
second (the part written; the cluster barrier when split), 11 the producer warp's epilogue rows done, 12–14 thread 0
after its first three epilogue rows (0 where unrecorded). The blocks of one launch are consecutive (a launch's blocks
all take their slot before its dependents can start).
Prints per product (the 1.5B shapes by N; the medians over the step's layers), in µs from the launch's release (the
earliest producer past its wait): when its blocks start, the first stage, the last stage, the epilogue's barriers and
rows, and the gap from the previous product's last epilogue row to this release.
Usage: python3 scripts/stream_gemm_timeline.py tl.b128 [more files]
"""
import statistics
import sys

NAMES = {8672: 'in_proj', 8192: 'fc1', 128256: 'lm_head'}


def launches_of(path):
    out, cur = [], None
    for line in open(path):
        r = list(map(int, line.split()))
        key, grid = r[5], r[6] >> 32
        if cur is None or cur['key'] != key or len(cur['blocks']) >= grid:
            cur = {'key': key, 'blocks': []}
            out.append(cur)
        cur['blocks'].append(r)
    return out


def summarise(path):
    stats, prev_end, order = {}, None, []
    for launch in launches_of(path):
        blocks = launch['blocks']
        n = launch['key'] & 0xffffffff
        name = NAMES.get(n)
        if name is None:  # N = 2048: out_proj follows the state kernel (a long gap), fc2 follows fc1
            name = f'n={n}'
            if n == 2048:
                name = 'fc2' if order and order[-1] == 'fc1' else 'out_proj'
        order.append(name)
        release = min(b[1] for b in blocks if b[1])

        def rel(j):
            return [b[j] - release for b in blocks if b[j]]

        row = {
            'start': statistics.median(rel(0)),
            'first': statistics.median(rel(2)),
            'last': statistics.median(rel(3)),
            'last max': max(rel(3)),
            'barrier 1': statistics.median(rel(9)),
            'barrier 2': statistics.median(rel(10)),
            'rows end': statistics.median(rel(4)),
            'rows end max': max(rel(4)),
            'row 1': statistics.median([b[12] - b[10] for b in blocks if b[12] and b[10]] or [0]),
        }
        if prev_end is not None:
            row['gap'] = release - prev_end
        prev_end = release + row['rows end max']
        stats.setdefault(name, []).append(row)
    print(f'== {path}')
    for name, rows in stats.items():
        keys = [k for k in rows[-1]]
        cells = '  '.join(f'{k} {statistics.median([r[k] for r in rows if k in r]) / 1000:6.2f}' for k in keys)
        print(f'  {name:9s} ×{len(rows):2d}  {cells}')


for p in sys.argv[1:]:
    summarise(p)
