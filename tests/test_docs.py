"""The README starts with the two commands, and they exist in the Makefile and CI."""

import re

from conftest import ROOT


def test_readme_starts_with_the_two_commands():
    head = (ROOT / "README.md").read_text().splitlines()[:6]
    assert any(line.startswith("make sample") for line in head)
    assert any(line.startswith("make test") for line in head)


def test_makefile_targets_and_ci():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^sample: install$", makefile, flags=re.M)
    assert re.search(r"^test: install$", makefile, flags=re.M)
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test")


def test_every_rule_has_a_log_and_scripts_exist():
    for smk in (ROOT / "workflow" / "rules").glob("*.smk"):
        text = smk.read_text()
        for rule in re.split(r"^(?:rule|checkpoint) ", text, flags=re.M)[1:]:
            name = rule.split(":")[0]
            assert "    log:" in rule, f"{smk.name}: rule {name} has no log"
            for script in re.findall(r'script:\s+"\.\./scripts/([\w.]+)"', rule):
                assert (ROOT / "workflow" / "scripts" / script).exists(), script
