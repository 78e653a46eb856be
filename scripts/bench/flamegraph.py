#!/usr/bin/env python3
"""Folded stacks (`a;b;c count` per line) to a flame graph SVG, with no tools beyond Python.

  python3 scripts/bench/flamegraph.py results/profile-X.folded -o results/profile-X.svg
Hover a frame for its name and share of the samples.
"""

import html
import sys
import zlib

WIDTH, ROW, FONT = 1400, 16, 11
MIN_PX = 0.3  # frames narrower than this are dropped: invisible anyway, and they bloat the file


def build_tree(lines):
    root = {"name": "all", "count": 0, "kids": {}}
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        root["count"] += n
        node = root
        for frame in stack.split(";"):
            node = node["kids"].setdefault(frame, {"name": frame, "count": 0, "kids": {}})
            node["count"] += n
    return root


def color(name):
    # Stable per name; warm hues like the classic flame graphs.
    h = zlib.crc32(name.encode())
    return f"rgb({205 + h % 50},{(h >> 8) % 180 + 40},{(h >> 16) % 55})"


def render(root):
    total = root["count"] or 1
    rects, depth_max = [], 0

    def walk(node, x, depth):
        nonlocal depth_max
        w = node["count"] / total * WIDTH
        if w < MIN_PX:
            return
        depth_max = max(depth_max, depth)
        rects.append((x, depth, w, node["name"], node["count"]))
        for kid in sorted(node["kids"].values(), key=lambda k: k["name"]):
            walk(kid, x, depth + 1)
            x += kid["count"] / total * WIDTH

    walk(root, 0.0, 0)
    height = (depth_max + 1) * ROW + 30
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
           f'font-family="monospace" font-size="{FONT}">',
           f'<text x="4" y="14">remora-proxy flame graph: {total} samples '
           '(hover a frame for its share)</text>']
    for x, depth, w, name, count in rects:
        y = height - (depth + 1) * ROW
        label = html.escape(name)
        pct = count / total * 100
        out.append(f'<g><title>{label} ({count} samples, {pct:.2f}%)</title>'
                   f'<rect x="{x:.2f}" y="{y}" width="{w:.2f}" height="{ROW - 1}" '
                   f'fill="{color(name)}"/>')
        chars = int(w / (FONT * 0.6))
        if chars >= 3:
            text = name if len(name) <= chars else name[: chars - 2] + ".."
            out.append(f'<text x="{x + 2:.2f}" y="{y + ROW - 4}">{html.escape(text)}</text>')
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    args = sys.argv[1:]
    if len(args) not in (1, 3) or (len(args) == 3 and args[1] != "-o"):
        sys.exit("usage: flamegraph.py STACKS.folded [-o OUT.svg]")
    with open(args[0]) as f:
        svg = render(build_tree(f))
    if len(args) == 3:
        with open(args[2], "w") as f:
            f.write(svg)
    else:
        sys.stdout.write(svg)


if __name__ == "__main__":
    main()
