"""The README is a front page: short, every relative link resolves, every docs/ page reachable from it,
its results table copied from the benchmark's files, and docs/benchmarks.md's tables what the benchmarks write."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
# [text](target) and ![alt](target); a target in angle brackets or with a title is not used here
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # no http:, mailto:


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces become hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_readme_is_at_most_250_lines():
    assert len(README.read_text().splitlines()) <= 250


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_an_existing_file_and_heading(page):
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{page.name} links to {target}: no such heading"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in relative_links(README)}
    assert PAGES and [p for p in PAGES if p.resolve() not in linked] == []


def test_readme_results_table_is_written_from_the_protocol_files(monkeypatch):
    """The README's table and docs/benchmarks.md's confirmation block are benchmarks/protocol.py's readme_block
    and docs_block of the committed choices, seed records and, once it is complete, the confirmation."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import importlib

    runner = importlib.import_module("protocol")  # benchmarks/protocol.py
    table = README.read_text().split("<!-- results:start -->\n", 1)[1].split("<!-- results:end -->", 1)[0]
    assert table == runner.readme_block()
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    block = page.split("<!-- confirmation:start -->\n", 1)[1].split("<!-- confirmation:end -->", 1)[0]
    assert block == runner.docs_block()


def test_benchmark_page_holds_what_make_benchmark_writes_from_the_results_files(tmp_path):
    """`make benchmark-variants` rewrites docs/benchmarks.md's block; from the committed results it changes nothing."""
    from tldr_tasks.benchmark import CRAWLS, update_readme

    page = tmp_path / "benchmarks.md"
    page.write_text((ROOT / "docs" / "benchmarks.md").read_text())
    update_readme(str(page), [json.loads((ROOT / "benchmarks" / "results" / f"benchmark_{c}.json").read_text())
                              for c in CRAWLS])
    assert page.read_text() == (ROOT / "docs" / "benchmarks.md").read_text()


def test_benchmark_page_holds_the_caption_tables_written_from_the_results_files(monkeypatch):
    """The caption benchmark's and the gate's tables as their scripts write them from the JSON files: in
    docs/benchmarks.md, and in the `.md` copies beside the JSON."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import caption_gate
    import captions

    results = ROOT / "benchmarks" / "results"
    tables = {path: captions.markdown(json.loads(path.read_text()))
              for path in sorted(results.glob("benchmark_captions_*.json"))}
    gate = results / "caption_gate.json"
    tables[gate] = caption_gate.markdown(json.loads(gate.read_text()))
    assert len(tables) == 4
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    for path, table in tables.items():
        assert table in page, f"docs/benchmarks.md lacks the table of {path.name}: copy it into 'The caption half'"
        assert path.with_suffix(".md").read_text() == table, f"{path.with_suffix('.md').name} is not {path.name}'s"


def test_default_paired_is_what_its_script_writes_from_the_benchmark_files(monkeypatch, tmp_path):
    """benchmarks/results/default_paired.json, which the README's semdedup rows read, made again from the
    benchmark's files there (the caption benchmark's files beside them too: the script passes them over)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import default_paired

    results = ROOT / "benchmarks" / "results"
    for path in results.glob("benchmark_*.json"):
        shutil.copy(path, tmp_path)
    default_paired.main(str(tmp_path))
    assert (tmp_path / "default_paired.json").read_text() == (results / "default_paired.json").read_text()


def test_the_shipped_caption_gate_is_the_one_chosen_on_validation():
    from tldr_tasks.config import CaptionConfig

    gate = json.loads((ROOT / "benchmarks" / "results" / "caption_gate.json").read_text())
    assert tuple(gate["gates"][gate["chosen_on_validation"]]) == (CaptionConfig().min_confidence,
                                                                  CaptionConfig().min_grounding)


def test_the_eval_power_and_pretrained_captioner_tables_are_written_from_their_results(monkeypatch):
    """docs/benchmarks.md's discriminative-power and pretrained-captioner tables are what benchmarks/eval_power.py
    and benchmarks/captioner_pretrained.py write from their JSON files (and their `.md` copies the same)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import captioner_pretrained
    import eval_power

    results = ROOT / "benchmarks" / "results"
    power = eval_power.markdown(json.loads((results / "eval_power.json").read_text()))
    summary = json.loads((results / "captioner_pretrained.json").read_text())["summary"]
    captioners = captioner_pretrained.markdown(summary)
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    assert text.split("<!-- eval_power:start -->\n", 1)[1].split("<!-- eval_power:end -->", 1)[0] == power
    assert captioners in text, "docs/benchmarks.md lacks captioner_pretrained's table: copy it into 'Pretrained towers'"
    assert (results / "eval_power.md").read_text() == power
    assert (results / "captioner_pretrained.md").read_text() == captioners
    paired = captioner_pretrained.paired_markdown(
        json.loads((results / "captioner_pretrained.json").read_text())["pretrained_minus_scratch"])
    assert paired in text and (results / "captioner_pretrained_paired.md").read_text() == paired


def test_the_protocol_table_is_written_from_its_results():
    """docs/benchmarks.md's protocol table is tldr_tasks.protocol.choices_markdown of the committed choices."""
    from tldr_tasks import protocol

    choices = json.loads((ROOT / "benchmarks" / "results" / "protocol_choices.json").read_text())
    table = protocol.choices_markdown(choices)
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    assert text.split("<!-- protocol:start -->\n", 1)[1].split("<!-- protocol:end -->", 1)[0] == table


def test_the_generated_blocks_are_written_from_their_results(monkeypatch):
    """docs/benchmarks.md's auto_ratio, curve_cost, proxy_variants and caption_half blocks are what those
    benchmarks/ scripts write from the committed files."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import importlib

    auto_ratio, curve_cost = importlib.import_module("auto_ratio"), importlib.import_module("curve_cost")
    proxy_variants = importlib.import_module("proxy_variants")
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    results = ROOT / "benchmarks" / "results"
    summary = json.loads((results / "auto_ratio.json").read_text())["summary"]
    variants = json.loads((results / "proxy_variants.json").read_text())
    caption_half = importlib.import_module("caption_half")
    for name, table in (("auto_ratio", auto_ratio.markdown(summary)), ("curve_cost", curve_cost.markdown()),
                        ("proxy_variants", proxy_variants.page(variants)), ("caption_half", caption_half.block())):
        assert text.split(f"<!-- {name}:start -->\n", 1)[1].split(f"<!-- {name}:end -->", 1)[0] == table
    readme = README.read_text().split("<!-- caption_half:start -->\n", 1)[1].split("<!-- caption_half:end -->", 1)[0]
    assert readme == caption_half.readme_block()
