"""``If-None-Match`` as RFC 9110 section 13.1.2 reads it: weak comparison, a list of tags, or ``*``.

Weak comparison ignores the ``W/`` prefix (a cache or proxy may weaken a strong tag), a client may list several
tags it holds, and ``*`` matches any current representation: the caller answers ``304`` for it only once it
knows the resource exists.
"""

from __future__ import annotations

import re

ANY = "*"

# entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE; etagc excludes DQUOTE, so a comma may sit inside the quotes
_ENTITY_TAG = re.compile(r'(?:W/)?("[^"]*")')


def none_match_tags(header: str | None) -> frozenset[str]:
    """The opaque tags (quoted, ``W/`` dropped) an ``If-None-Match`` value lists, or ``{"*"}``; empty when absent
    or unreadable (then the condition is simply not met)."""
    if header is None:
        return frozenset()
    if header.strip() == ANY:
        return frozenset({ANY})
    return frozenset(_ENTITY_TAG.findall(header))
