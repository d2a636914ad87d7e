"""Every example config in the repository validates against schemas/config.schema.json.

The schema is generated from the daemon's config types (a Rust test fails when it drifts);
this checks it from the outside, with an independent validator, on the examples people copy.
"""

import json
import pathlib
import re

import jsonschema
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "schemas" / "config.schema.json").read_text())


def examples():
    yield "schemas/config.example.yaml", (ROOT / "schemas" / "config.example.yaml").read_text()
    for path in sorted((ROOT / "rules").glob("*.yaml")):
        if not path.name.endswith(".test.yaml"):
            yield str(path.relative_to(ROOT)), path.read_text()
    readme = (ROOT / "README.md").read_text()
    for i, block in enumerate(re.findall(r"```yaml\n(.*?)```", readme, re.S)):
        yield f"README.md yaml block {i + 1}", block


@pytest.mark.parametrize("name,text", list(examples()), ids=lambda v: v if isinstance(v, str) and len(v) < 60 else "")
def test_example_matches_the_schema(name, text):
    jsonschema.validate(yaml.safe_load(text) or {}, SCHEMA)


def test_the_schema_rejects_unknown_keys():
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"limts": {}}, SCHEMA)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"backends": {"a": {"type": "openai", "base_ulr": "x"}}}, SCHEMA)
