"""What the edit forms share with the models that validate them (destinations, rules, remote
nodes): each problem the model found shown at its field. Help texts come from the models'
``Doc`` descriptions (``router.config_types.docs_of``), written once for the file, the API's
OpenAPI document and the forms.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(.*)$")


def at_fields(problems: Mapping[str, str]) -> dict[str, str]:
    """Problem path -> message (``calling_aet[1]``, ``match[0].tag``, ``port``) to form field
    -> message (``calling_aet``: ``item 2: ...``); a field's several problems are joined.
    Problems of the whole object stay under their key ("" becomes ``form``)."""
    fields: dict[str, list[str]] = {}
    for path, message in problems.items():
        found = _FIELD.match(path)
        field, rest = (found[1], found[2]) if found else ("form", path)
        item = re.match(r"^\[(\d+)\]\.?(.*)$", rest)
        if item:
            inner = f"{item[2]}: " if item[2] else ""
            text = f"item {int(item[1]) + 1}: {inner}{message}"
        else:
            text = f"{rest.lstrip('.')}: {message}" if rest else message
        fields.setdefault(field, []).append(text)
    return {field: "; ".join(texts) for field, texts in fields.items()}
