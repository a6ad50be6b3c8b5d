"""Print the README's troubleshooting table from the catalogue's actual messages.

    RELIABILITY_MESSAGES=/tmp/messages.json python -m pytest tests/reliability/test_bad_input_catalogue.py
    python -m tests.reliability.readme_table /tmp/messages.json
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from tests.reliability.test_bad_input_catalogue import CASES


def _generic(message: str) -> str:
    """Temporary folders of the test run become placeholders."""
    message = re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/[^/ ]+?/", "…/", message)
    return message.replace("|", "\\|")


def main(path: str) -> None:
    messages = json.loads(Path(path).read_text())
    print("| bad input | command | message |\n|---|---|---|")
    for case, (argv, _) in CASES.items():
        if case in messages:
            print(f"| {case} | `{argv[0]}` | `{_generic(messages[case])}` |")


if __name__ == "__main__":
    main(sys.argv[1])
