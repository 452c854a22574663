#!/usr/bin/env python3
"""An SVG plot of mean KL divergence (log scale) against effective bits per weight, from the TSV that
bench/auto_quantize_sweep.sh writes: uniform formats as labelled points, each auto method as a line.
Standard library only.

    python3 bench/plot_bits.py SWEEP.tsv OUT.svg "title"
"""
import csv
import math
import sys


def main():
    tsv, out, title = sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else ""
    rows = list(csv.DictReader(open(tsv), delimiter="\t"))
    pts = [(r["kind"], r["name"], float(r["bits"]), float(r["mean_kld"])) for r in rows if float(r["mean_kld"]) > 0]
    if not pts:
        sys.exit("no points")
    W, H, L, R, T, B = 720, 440, 70, 160, 40, 50
    xmin, xmax = 4.0, max(8.5, max(p[2] for p in pts) + 0.25)
    ylo = math.floor(math.log10(min(p[3] for p in pts)) * 2) / 2
    yhi = math.ceil(math.log10(max(p[3] for p in pts)) * 2) / 2
    if yhi - ylo < 0.5:
        yhi = ylo + 0.5

    def X(b):
        return L + (b - xmin) / (xmax - xmin) * (W - L - R)

    def Y(k):
        return T + (yhi - math.log10(k)) / (yhi - ylo) * (H - T - B)

    s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>']
    b = 4.0
    while b <= xmax + 1e-9:
        s.append(f'<line x1="{X(b):.1f}" y1="{T}" x2="{X(b):.1f}" y2="{H - B}" stroke="#ddd"/>')
        s.append(f'<text x="{X(b):.1f}" y="{H - B + 16}" text-anchor="middle">{b:g}</text>')
        b += 0.5
    e = ylo
    while e <= yhi + 1e-9:
        y = Y(10 ** e)
        s.append(f'<line x1="{L}" y1="{y:.1f}" x2="{W - R}" y2="{y:.1f}" stroke="#ddd"/>')
        s.append(f'<text x="{L - 6}" y="{y + 4:.1f}" text-anchor="end">{10 ** e:.2g}</text>')
        e += 0.5
    s.append(f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">effective bits per weight</text>')
    s.append(f'<text x="16" y="{(T + H - B) / 2}" text-anchor="middle" transform="rotate(-90 16 {(T + H - B) / 2})">mean KLD vs 16-bit (log)</text>')
    colors = {"auto-gradient": "#1f77b4", "auto-kl": "#d62728"}
    legend_y = T + 10
    for kind, color in colors.items():
        line = sorted((p[2], p[3]) for p in pts if p[0] == kind)
        if not line:
            continue
        path = " ".join(f"{X(b):.1f},{Y(k):.1f}" for b, k in line)
        s.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for b, k in line:
            s.append(f'<circle cx="{X(b):.1f}" cy="{Y(k):.1f}" r="3.5" fill="{color}"/>')
        s.append(f'<line x1="{W - R + 12}" y1="{legend_y}" x2="{W - R + 32}" y2="{legend_y}" stroke="{color}" stroke-width="2"/>')
        s.append(f'<text x="{W - R + 38}" y="{legend_y + 4}">{kind.replace("auto-", "auto, ")} score</text>')
        legend_y += 18
    placed = []  # label positions so far: a label that would overlap one moves up a line
    for kind, name, b, k in sorted(p for p in pts if p[0] == "uniform"):
        s.append(f'<rect x="{X(b) - 3.5:.1f}" y="{Y(k) - 3.5:.1f}" width="7" height="7" fill="#555"/>')
        x, y = X(b) + 6, Y(k) - 5
        while any(abs(x - px) < 7 * max(len(name), len(pn)) and abs(y - py) < 13 for px, py, pn in placed):
            y -= 13
        placed.append((x, y, name))
        s.append(f'<text x="{x:.1f}" y="{y:.1f}" fill="#333">{name}</text>')
    s.append(f'<rect x="{W - R + 14}" y="{legend_y - 4}" width="7" height="7" fill="#555"/>')
    s.append(f'<text x="{W - R + 38}" y="{legend_y + 4}">uniform format</text>')
    s.append("</svg>")
    open(out, "w").write("\n".join(s) + "\n")


if __name__ == "__main__":
    main()
