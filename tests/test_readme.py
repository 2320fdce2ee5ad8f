"""The README stays a product page: short, its links resolve, and its tables equal the committed metrics."""

import json
import re
from pathlib import Path

import pytest

from llmcarve import readme

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 250

# [text](target) where target is a relative path (not http:, not mailto:), optionally with #anchor.
LINK = re.compile(r"\]\((?P<path>(?![a-z]+:)[^)#\s]*)(?:#(?P<anchor>[^)\s]+))?\)")


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's heading slugs: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return anchors


def broken_links(page: Path) -> list[str]:
    broken = []
    for match in LINK.finditer(page.read_text()):
        target = (page.parent / match["path"]).resolve() if match["path"] else page
        if not target.exists():
            broken.append(f"{match['path']} (no such file)")
        elif match["anchor"] and target.suffix == ".md" and match["anchor"] not in heading_anchors(target.read_text()):
            broken.append(f"{match['path']}#{match['anchor']} (no such heading)")
    return broken


def test_readme_is_at_most_250_lines():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail to docs/ to keep it <= {MAX_README_LINES}"


def test_readme_links_into_docs_and_every_link_resolves():
    targets = {match["path"] for match in LINK.finditer(README.read_text())}
    assert any(path.startswith("docs/") for path in targets), "README.md links to no docs/ page"
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        assert not broken_links(page), f"{page.relative_to(ROOT)} has broken links: {broken_links(page)}"


def test_results_blocks_are_in_place():
    assert set(readme.block_names(README.read_text())) == {"gpu-tomoe", "gpu-atp", "cpu-results"}
    assert readme.block_names((ROOT / "docs/export-and-registry.md").read_text()) == ["onnx-results", "onnx-cpu"]


@pytest.mark.parametrize("name", readme.GENERATED_FILES)
def test_generated_blocks_equal_the_committed_metrics(name):
    text = (ROOT / name).read_text()
    assert readme.render_blocks(text, ROOT) == text, f"{name}: a generated table is stale; run `make readme`"


# The renderer itself, on a project of its own: a changed metric must show up as a stale block.


def model_report(ppl: float) -> dict:
    accuracy = {"acc": 0.5, "n": 4}
    return {
        "active_ratio": 0.5,
        "params_total": 2_000_000,
        "ppl": {"heldout": {"ppl": ppl, "windows": 2, "protocol": {"seq_len": 16, "add_bos": False}}},
        "zero_shot": {"piqa": accuracy},
        "domain": {"medqa": accuracy},
        "speed": {"device": "cpu", "threads": 1, "prefill_tokens_per_s": 100.0, "decode_tokens_per_s": 10.0},
    }


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "metrics").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# x\n<!-- begin: cpu-results -->\nold table\n<!-- end: cpu-results -->\ntail\n")
    (tmp_path / "docs/export-and-registry.md").write_text("# no generated blocks here\n")
    write_evaluate(tmp_path, {"dense": model_report(12.5), "static@0.5": model_report(345.25)})
    return tmp_path


def write_evaluate(root: Path, models: dict) -> None:
    (root / readme.CPU_EVALUATE).write_text(json.dumps({"models": models}))


def test_renderer_rewrites_a_stale_block_and_then_reports_it_current(project: Path):
    assert readme.main(["--root", str(project), "--check"]) == 1
    assert readme.main(["--root", str(project)]) == 0
    text = (project / "README.md").read_text()
    assert "old table" not in text and text.endswith("<!-- end: cpu-results -->\ntail\n")
    assert "| `static@0.5` | 0.500 | 2.0M | 345.25 |" in text
    assert "(2 models, `metrics/evaluate.json`)" in text
    assert readme.main(["--root", str(project), "--check"]) == 0

    write_evaluate(project, {"dense": model_report(12.5), "static@0.5": model_report(345.5)})
    assert readme.stale_files(project) == ["README.md"]


def test_unknown_block_and_missing_metrics_say_what_to_do(project: Path):
    with pytest.raises(KeyError, match="known blocks: cpu-results"):
        readme.render_blocks("<!-- begin: cpu-table -->\n<!-- end: cpu-table -->", project)
    (project / readme.CPU_EVALUATE).unlink()
    with pytest.raises(FileNotFoundError, match="make readme"):
        readme.render_blocks((project / "README.md").read_text(), project)
