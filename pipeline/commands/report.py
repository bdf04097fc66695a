"""`python -m pipeline report OUTPUT`: write OUTPUT/report.md and report.html from the artifacts' manifests
(`pipeline.tools.report`; `run` writes them too at the end of a recipe)."""
from __future__ import annotations

import argparse

from pipeline.tools.report import write_report


def add_parser(sub) -> argparse.ArgumentParser:
    report = sub.add_parser("report", help="write OUTPUT/report.md and report.html from the artifacts' manifests")
    report.add_argument("output_dir")
    return report


def main(args) -> int:
    print(write_report(args.output_dir))
    return 0
