"""The configuration example in the README stays valid as the settings change."""

from __future__ import annotations

import re
from pathlib import Path

from router.config_check import check_config


def test_readme_configuration_example_passes_check_config(tmp_path: Path) -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    example = re.search(r"```toml\n(.*?)```", readme, re.S)
    assert example, "README has no TOML example"
    path = tmp_path / "router.toml"
    path.write_text(example.group(1))
    assert check_config(path) == []
