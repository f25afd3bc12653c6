"""The README's results table quotes only numbers that the committed metrics.json files hold."""
import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def numbers(tree):
    if isinstance(tree, dict):
        return [n for value in tree.values() for n in numbers(value)]
    if isinstance(tree, list):
        return [n for value in tree for n in numbers(value)]
    return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def test_every_number_of_the_results_table_is_in_a_committed_metrics_file():
    committed = {q: numbers(json.load(open(p))) for q in ("q1", "q2", "q3_toy", "q3_mnistm")
                 for p in [os.path.join(ROOT, "outputs", q, "metrics.json")]}
    readme = open(os.path.join(ROOT, "README.md")).read()
    rows = [line for line in readme.splitlines() if line.startswith("| [")][:4]
    assert len(rows) == 4
    for row, question in zip(rows, committed):
        ours = row.split("|")[2]
        quoted = re.findall(r"(\d+\.\d+)( %)?", re.sub(r"[zs] \d+ / [zs] \d+", "", ours))
        assert quoted, row
        for text, percent in quoted:
            value = float(text) / (100 if percent else 1)
            half = 0.5 * 10 ** -len(text.split(".")[1]) / (100 if percent else 1)
            assert any(abs(n - value) <= half + 1e-12 for n in committed[question]), (
                f"{question}: {text}{percent} is in no committed number")
