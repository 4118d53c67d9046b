"""What the research examples share: their command line and where their figure goes.

``run(main, doc)`` parses ``--smoke`` / ``--out DIR`` and starts ``main(smoke, out)`` on 2 gloo ranks
(or joins torchrun). ``save_figure(fig, out, name)`` writes the figure to ``--out DIR``, or to a temp
folder that is removed at once (the example still shows it can be drawn), and says which.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from flex_model.launch import launch


def save_figure(fig: Any, out: Optional[str], name: str) -> None:
    import matplotlib.pyplot as plt

    folder = Path(out) if out else Path(tempfile.mkdtemp(prefix=f"flex_{Path(name).stem}_"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(folder / name, dpi=100)
        print(f"wrote {folder / name}")
    finally:
        plt.close(fig)
        if not out:
            shutil.rmtree(folder)
            print(f"removed the temp folder {folder} (pass --out DIR to keep {name})")


def run(main: Callable[[bool, Optional[str]], None], doc: str, smoke_help: str) -> None:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="folder for the figure, kept (default: a temp folder, removed at the end)")
    args = parser.parse_args()
    launch(main, nprocs=2, args=(args.smoke, args.out))
    sys.exit(0)
