"""What every experiment writes: a JSON report, a markdown table, figures."""

import json
import os


def pyplot():
  """``matplotlib.pyplot`` with the non-interactive Agg backend (figures are
  only written to files, also on machines without a display)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def write(out_dir: str, name: str, report: dict, markdown: str) -> None:
  """Creates ``out_dir`` and writes ``<name>.json`` (the report, indented)
  and ``table.md`` (``markdown``) into it."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
    json.dump(report, f, indent=1)
  with open(os.path.join(out_dir, "table.md"), "w") as f:
    f.write(markdown)
