"""The README's HTTP API section has a curl example for every endpoint the service serves, and each example
names a real route (checked against the app's OpenAPI, so a new route without an example fails here)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE_OPENAPI = {("GET", "/metrics")}


def _curl_examples() -> set[tuple[str, str]]:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## HTTP API"):]
    section = section[:section.index("\n## ", 1)]
    found = set()
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if not line.startswith("curl "):
                continue
            args = shlex.split(line)
            method = args[args.index("-X") + 1] if "-X" in args else \
                "POST" if {"-F", "-d"} & set(args) else "GET"
            url = next(a for a in args if a.startswith("localhost:8000"))
            found.add((method, url.removeprefix("localhost:8000").split("?")[0]))
    return found


def test_every_endpoint_has_a_curl_example(make_settings):
    from service.app import create_app

    schema = create_app(make_settings()).openapi()
    routes = {(method.upper(), path) for path, ops in schema["paths"].items() for method in ops} | OUTSIDE_OPENAPI
    examples = _curl_examples()

    def matches(route: tuple[str, str], example: tuple[str, str]) -> bool:
        pattern = "".join("[^/]+" if part.startswith("{") else re.escape(part)
                          for part in re.split(r"(\{[^}]+\})", route[1]))
        return route[0] == example[0] and re.fullmatch(pattern, example[1]) is not None

    without_example = sorted(r for r in routes if not any(matches(r, e) for e in examples))
    assert without_example == []
    unknown = sorted(e for e in examples if not any(matches(r, e) for r in routes))
    assert unknown == []
