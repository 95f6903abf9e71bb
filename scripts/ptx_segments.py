#!/usr/bin/env python3
"""Instruction counts of a CUDA kernel's PTX between its block barriers, for comparing two forms of a kernel on a
machine without a GPU or a SASS disassembler (this project's development machines have neither).

    nvcc -O3 -DNDEBUG --generate-code=arch=compute_90,code=[compute_90] -std=c++17 -DMAMBA3_HAVE_CUDA -I src \
        -ptx -o /tmp/k.ptx src/cuda/train/mamba3_train_fwd_walk.cu
    scripts/ptx_segments.py /tmp/k.ptx 'fwd_walk_kernelILi128ELi64E' [--ops]

Per segment (the code after one bar.sync up to the next): its static instruction count and each loop inside it (a
backward branch to a label of the segment: the label and the loop body's instruction count), so that a dynamic
count is static + body × (trips − 1). PTX is not SASS — ptxas folds, schedules and rematerialises — but the ratio
between two forms of the same kernel tracks the executed instructions well enough to rank them before a device run.
For fully unrolled code the SASS itself can be counted without a disassembler: compile with -cubin and divide the
kernel's .text section size (`readelf -SW k.cubin`) by 16 bytes per sm_90 instruction.
"""
import collections
import re
import sys


def kernel_body(ptx: str, name_part: str) -> list[str]:
    m = re.search(r"\.entry (\S*" + re.escape(name_part) + r"\S*)\(", ptx)
    if not m:
        sys.exit(f"ptx_segments: no .entry containing '{name_part}'")
    end = ptx.find("\n}\n", m.start())
    return ptx[m.start():end].split("\n")


def segments(lines: list[str]):
    segs = [[]]
    for line in lines:
        s = line.strip()
        if not s or s.startswith("//") or s.startswith(".") or s in ("{", "}"):
            continue
        if s.endswith(":"):
            segs[-1].append(("label", s[:-1]))
            continue
        segs[-1].append(("insn", s))
        if re.match(r"(@\S+\s+)?(bar|barrier)\.sync", s):
            segs.append([])
    return segs


def describe(seg, with_ops: bool) -> str:
    count, labels, loops, ops = 0, {}, [], collections.Counter()
    for kind, text in seg:
        if kind == "label":
            labels[text] = count
            continue
        count += 1
        body = text.split(None, 1)[1] if text.startswith("@") else text
        ops[body.split()[0].rstrip(";")] += 1
        m = re.search(r"bra(\.uni)?\s+(\S+);", text)
        if m and m.group(2) in labels:
            loops.append(f"{m.group(2)}:{count - labels[m.group(2)]}")
    line = f"{count:6d}  loops {' '.join(loops) or '-'}"
    if with_ops:
        line += "\n        " + " ".join(f"{o}:{n}" for o, n in ops.most_common(24))
    return line


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        ptx = f.read()
    with_ops = "--ops" in sys.argv[3:]
    for i, seg in enumerate(segments(kernel_body(ptx, sys.argv[2]))):
        print(f"segment {i}: {describe(seg, with_ops)}")


if __name__ == "__main__":
    main()
