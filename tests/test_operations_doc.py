"""The runbook keeps up with what it documents: every alert's runbook link
lands on a section, and every metric the daemon exposes is described."""

from __future__ import annotations

import re
from pathlib import Path

from tests.test_deploy_files import alert_rules
from tokend.metrics import REGISTRY

RUNBOOK = Path(__file__).resolve().parents[1] / "docs" / "operations.md"


def anchors(markdown: str) -> set[str]:
    """The anchors a Markdown renderer gives headings (GitHub's rule)."""
    found = set()
    for heading in re.findall(r"^#{1,6} (.+)$", markdown, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
        found.add(slug.replace(" ", "-"))
    return found


def test_every_alert_links_to_a_section_of_the_runbook() -> None:
    sections = anchors(RUNBOOK.read_text())

    for rule in alert_rules():
        url = rule["annotations"]["runbook_url"]
        path, _, anchor = url.partition("#")
        assert path == "docs/operations.md", url
        assert anchor in sections, f"{rule['alert']}: no section #{anchor}"


def test_every_internal_link_of_the_runbook_resolves() -> None:
    text = RUNBOOK.read_text()
    sections = anchors(text)

    for anchor in re.findall(r"\]\(#([^)]+)\)", text):
        assert anchor in sections, anchor


def test_every_exposed_metric_is_described() -> None:
    documented = set(re.findall(r"^\| `(tokend_[a-z_]+)`", RUNBOOK.read_text(), re.M))
    exposed = set()
    for family in REGISTRY.collect():
        suffix = "_total" if family.type == "counter" else ""
        exposed.add(family.name + suffix)

    assert documented == exposed
