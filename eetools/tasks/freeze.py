"""Write the frozen test splits ``data/tasks/<task>-test.jsonl`` (run once; committed).

Test examples are drawn with seed -1, which no training stream uses (those seeds are >= 0).
"""

from __future__ import annotations

import sys

from eetools.io.paths import data_dir
from eetools.tasks import NAMES, get, save_jsonl

TEST_SEED = -1
TEST_SIZE = 500


def main() -> None:
    for name in NAMES:
        path = data_dir() / "tasks" / f"{name}-test.jsonl"
        save_jsonl(get(name).sample(TEST_SIZE, seed=TEST_SEED), path)
        print(f"wrote {TEST_SIZE} examples to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
