"""Copy each finished experiment's Markdown table and plot into docs/results.md and docs/img/.

    .venv/bin/python experiments/results/publish.py [--runs runs/experiments]

docs/results.md holds ``<!-- BEGIN name -->`` / ``<!-- END name -->`` markers; the text between them is
replaced by ``name/results.md`` and the plot is copied to ``docs/img/results_name.png``. ``name`` is looked
for in ``--runs`` (the experiments' default output), then in ``experiments/results/``: studies too long to
run in one sitting write there (``--out experiments/results/name``) and their finished runs' records are
committed, so the same command on any clone reads them back and trains only the runs still missing.
Experiments without results keep their text ("not run yet").
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

from nestvit.fileio import atomic_write_text

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", default=str(ROOT / "runs" / "experiments"))
    p.add_argument("--doc", default=str(ROOT / "docs" / "results.md"))
    a = p.parse_args()
    doc = Path(a.doc)
    text = doc.read_text()
    for name in re.findall(r"<!-- BEGIN (\w+) -->", text):
        src = next((d for d in (Path(a.runs) / name, ROOT / "experiments" / "results" / name)
                    if (d / "results.md").is_file()), None)
        if src is None:
            print(f"{name}: no results, left as it is")
            continue
        table = (src / "results.md").read_text().strip()
        img = f"img/results_{name}.png"
        if (src / "results.png").is_file():
            shutil.copyfile(src / "results.png", doc.parent / img)
            table += f"\n\n![{name}]({img})"
        block = f"<!-- BEGIN {name} -->\n{table}\n<!-- END {name} -->"
        text = re.sub(rf"<!-- BEGIN {name} -->.*?<!-- END {name} -->", lambda m, b=block: b, text, flags=re.S)
        print(f"{name}: published")
    atomic_write_text(doc, text)


if __name__ == "__main__":
    main()
