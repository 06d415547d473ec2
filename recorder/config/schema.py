"""JSON Schema of a run-definition file (for editors: YAML language servers, CI linters).

``k2eg-recorder validate --schema > k2eg-recorder-runs.schema.json``; then, in VS Code
with the YAML extension, ``# yaml-language-server: $schema=k2eg-recorder-runs.schema.json``
at the top of a run file gives completion and inline checks. The loader stays the authority
(cross-file checks, line numbers); the schema is a convenience.
"""

from __future__ import annotations

from typing import Any

from recorder.config.models import RunDefinition

__all__ = ["run_file_schema"]


def run_file_schema() -> dict[str, Any]:
    """A file holds one run, or ``runs:`` with a list of runs (and nothing else)."""
    run = RunDefinition.model_json_schema(ref_template="#/$defs/{model}")
    defs = run.pop("$defs", {})
    defs["RunDefinition"] = run
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "k2eg-recorder run definitions",
        "oneOf": [
            {"$ref": "#/$defs/RunDefinition"},
            {
                "type": "object",
                "properties": {
                    "runs": {"type": "array", "items": {"$ref": "#/$defs/RunDefinition"}}
                },
                "required": ["runs"],
                "additionalProperties": False,
            },
        ],
        "$defs": defs,
    }
