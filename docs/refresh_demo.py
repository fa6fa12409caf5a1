"""Regenerate the README's demo tables and figures from the demo's own output.

Runs `attrib demo --out DIR --quiet` (the command `make demo` runs), then replaces each README
block between `<!-- demo:KEY -->` and `<!-- /demo:KEY -->` with the table the demo printed
under the matching heading, verbatim, copies the figures to docs/, and stamps the date, the
machine and the demo's wall time. Run from the repository root, in its environment:
`.venv/bin/python docs/refresh_demo.py` (about two minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# README block key → the start of the heading the demo prints above that table
SECTIONS = {"stages": "stages (from the logged accuracies)",
            "stage-effects": "stage accountability:",
            "layers": "path kernel:",
            "completeness": "completeness:",
            "neurons": "neurons moved most"}
FIGURES = {"training.png": "demo-training.png", "similarity.png": "demo-similarity.png"}


def printed_tables(output: str) -> dict[str, str]:
    """Heading key → the table printed after it (up to the next blank line)."""
    blocks = [b.strip("\n") for b in output.split("\n\n")]
    tables = {}
    for key, heading in SECTIONS.items():
        for block in blocks:
            first, _, table = block.partition("\n")
            if first.startswith(heading) and table:
                tables[key] = table
                break
        else:
            raise SystemExit(f"the demo printed no table under {heading!r}:\n{output}")
    return tables


def replace_block(text: str, key: str, body: str) -> str:
    name = re.escape(key)
    pattern = re.compile(rf"(<!-- demo:{name} -->\n).*?(\n<!-- /demo:{name} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no <!-- demo:{key} --> ... <!-- /demo:{key} --> block")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args()
    attrib = Path(sys.executable).with_name("attrib")
    with tempfile.TemporaryDirectory() as tmp:
        started = time.monotonic()
        done = subprocess.run([str(attrib), "demo", "--out", tmp, "--quiet"], cwd=ROOT,
                              capture_output=True, text=True, env={**os.environ})
        seconds = time.monotonic() - started
        if done.returncode:
            raise SystemExit(f"attrib demo failed:\n{done.stdout}\n{done.stderr}")
        tables = printed_tables(done.stdout)
        for produced, kept in FIGURES.items():
            shutil.copyfile(Path(tmp) / produced, ROOT / "docs" / kept)
    text = args.readme.read_text()
    for key, table in tables.items():
        text = replace_block(text, key, f"```\n{table}\n```")
    machine = f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores"
    text = replace_block(text, "provenance",
                         f"(Figures and tables: `python docs/refresh_demo.py`, which runs "
                         f"`attrib demo`, on {time.strftime('%Y-%m-%d')}, {machine}: the demo "
                         f"took {seconds / 60:.1f} minutes.)")
    args.readme.write_text(text)
    print(f"README.md: {len(tables)} tables and {len(FIGURES)} figures refreshed "
          f"(demo {seconds:.0f} s)")


if __name__ == "__main__":
    main()
