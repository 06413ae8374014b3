"""Security faults: remote model code that must not run without ``policy.trust_remote_code``, and YAML that
would construct Python objects."""

from __future__ import annotations

import json
from pathlib import Path

from raysys.testing.faults.builders import yaml_cfg
from raysys.testing.faults.harness import Case, World


def _booby_trapped(w: World) -> Path:
    """A Sa2VA-looking folder whose modeling code would overwrite a file outside it if it ever ran."""
    folder = w.root / "sa2va"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"auto_map": {"AutoModel": "modeling_sa2va_chat.Sa2VAChatModel"}})
    )
    (folder / "modeling_sa2va_chat.py").write_text(
        f"open({str(w.root / 'outside.txt')!r}, 'w').write('pwned')\n"
    )
    return folder


# remote model code and YAML that must not run
CASES: list[Case] = [
    Case(
        "security-sa2va-remote-code-opt-in",
        "security",
        lambda w: ["eval", *w.run("policy.kind=sa2va", f"policy.checkpoint={_booby_trapped(w)}")],
        2,
        r"policy\.trust_remote_code.*runs with your permissions",
    ),
    Case(
        "security-sa2va-missing-folder",
        "checkpoint",
        lambda w: [
            "eval",
            *w.run(
                "policy.kind=sa2va", f"policy.checkpoint={w.root / 'sa2va'}", "policy.trust_remote_code=true"
            ),
        ],
        2,
        r"sa2va.*no model-hub access",
    ),
    Case(
        "security-yaml-python-tag",
        "security",
        yaml_cfg("run: !!python/object/apply:os.system ['echo pwned']\n"),
        2,
        r"cfg\.yaml",
    ),
]
