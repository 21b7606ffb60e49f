"""What the dashboard may open, and how it shows strings that its code did not write.

**Which stores.** Whoever reaches the page can type a path in the sidebar, so the page opens only files under one
folder: ``--stores DIR`` on the command line (after ``--``), else ``$STALEFLOWER_DASHBOARD_STORES``, else the
folder of the store the dashboard was started on (``--db``, else the runners' default): ``results/`` for
``make dashboard``. A typed path is resolved with ``os.path.realpath`` (``~``, ``..`` and every symbolic link
followed) before it is compared with the folder, itself resolved the same way, so neither ``../../etc/x.db`` nor
a link inside the folder that points outside gets through; a refused path is never stat-ed or opened, so the
page does not even say whether it exists. This was chosen over accepting any file whose schema is a metrics
store's: the schema check still applies to what is inside the folder, but on its own it would open (and report
on) any SQLite file the server's user can read, and any other run's store anywhere on the machine.

**Which strings.** Run labels are built from the stored strategy name (a run config may name any
``package.module:Class``), errors and reasons come from the store, and the path is typed by the user: a string
like ``![x](http://host/x.png)`` in a Markdown-rendering element (``st.markdown``, ``st.caption``, alerts,
headers, widget labels and help) would load an external image or draw a link. ``md`` escapes every ASCII
punctuation character with a backslash (CommonMark renders an escaped character literally, and Streamlit's
``:color[...]`` directives and ``$`` maths are disabled the same way), so the string shows exactly as stored.
Tables (``st.dataframe``), ``st.json``, option lists of select boxes and chart legends draw plain text already.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from dashboard.queries import StoreError, default_db

STORES_ENV = "STALEFLOWER_DASHBOARD_STORES"
_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")  # every ASCII punctuation character


def md(text: object) -> str:
    """``text`` escaped for a Markdown-rendering element: it renders literally, with no markup of its own."""
    return _PUNCTUATION.sub(r"\\\1", str(text))


def store_root(argv: list[str] | None = None) -> Path:
    """The folder (resolved) the page may open stores under.

    ``--stores DIR``, else ``$STALEFLOWER_DASHBOARD_STORES``, else the folder of the store given with ``--db`` (or
    of the runners' default store).
    """
    args = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    parser.add_argument("--stores", default="")
    try:
        stores = parser.parse_known_args(args)[0].stores or ""
    except argparse.ArgumentError:
        stores = ""
    folder = stores or os.environ.get(STORES_ENV, "") or str(Path(default_db(args)).expanduser().parent)
    return Path(os.path.realpath(os.path.expanduser(folder)))


def allowed_store(path: str | Path, root: Path) -> Path:
    """``path`` resolved, if it lies under ``root``; else ``StoreError('refused')`` without touching the file."""
    resolved = Path(os.path.realpath(os.path.expanduser(str(path))))
    base = Path(os.path.realpath(root))
    if resolved != base and not resolved.is_relative_to(base):
        raise StoreError("refused", f"Refused: {path} is not under {base}, the only folder this dashboard opens "
                                    "stores from (links and .. are followed before the check). Start it with "
                                    f"--stores DIR (or ${STORES_ENV}) to open stores elsewhere.")
    return resolved
