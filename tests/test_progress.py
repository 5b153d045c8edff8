"""Progress outside a terminal: plain lines, each showing the count it was printed at."""

from __future__ import annotations

import re
import time

from sea_convert.progress import progress_bar


def test_plain_lines_with_current_counts(capsys, monkeypatch):
    monkeypatch.setenv("SEA_CONVERT_PROGRESS_EVERY_S", "0.2")
    for _ in progress_bar(range(8), desc="steps"):
        time.sleep(0.12)
    err = capsys.readouterr().err
    assert "\r" not in err
    counts = [int(m) for m in re.findall(r"\| *(\d+)/8 \[", err)]
    # a line at least every 0.2 s over ~1 s of work, each with the count reached (the closing line repeats the last)
    assert len(counts) >= 3 and counts[-1] == 8, err
    assert counts[:-1] == sorted(set(counts[:-1])) and counts[-2] >= 6, err
