"""What of an entity's state is listed and searched: declared next to its commands, read
by the worker when it writes the entity's snapshot to the cache and its index."""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

S = TypeVar("S", bound=BaseModel)

MAX_TEXT_LENGTH = 200
"""Searchable text is cut to this many characters: a prefix search never needs more."""


def searchable(text: str) -> str:
    """Text as it is indexed and searched: case folded, in one Unicode form, so that a name
    is found whatever case and form either is typed in ("STRASSE" finds "Straße", "ΣΊΣ"
    finds "Σίσυφος", a decomposed "José" the composed one); `str.lower` missed them. The
    dotted capital I folds to a plain i: folded alone it is i and a combining dot above, and
    "ist" missed "İstanbul"."""
    folded = unicodedata.normalize("NFD", text).casefold().replace(DOTTED_I, "i")
    return unicodedata.normalize("NFC", folded)


DOTTED_I = "i\u0307"
"""What the dotted capital I (İ, Turkish and Azeri) case folds to: i and a combining dot."""


@dataclass(frozen=True)
class IndexValues:
    """One entity's indexed values: its status (counted per value), exact-match tags, the
    text its prefix search finds it by, and its numbers."""

    status: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    text: tuple[str, ...] = ()
    numbers: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Listing(Generic[S]):
    """An entity type's listing declaration (`EntityType.listing`). Every type is listed by
    last update and by id, and searched by id prefix; the rest is what it declares."""

    status: Callable[[S], str] | None = None
    tags: Mapping[str, Callable[[S], str]] = field(default_factory=dict)
    text: Callable[[S], list[str]] | None = None
    numbers: Mapping[str, Callable[[S], int]] = field(default_factory=dict)
    owned_by: str | None = None
    """How a customer's own entities are found: `id` when an entity's id is the account
    that owns it, or the tag naming that account; None lists nothing to customers (unless
    the policy lets every customer read every entity)."""

    def values(self, model: type[S], state: Mapping[str, Any] | None) -> IndexValues | None:
        """The entity's values from its snapshot's state; None when it has no state (it
        does not exist) or a state this declaration cannot read (then it is listed by
        update and id only)."""
        if state is None:
            return None
        try:
            typed = model.model_validate(state)
        except ValidationError:
            return IndexValues()
        return IndexValues(
            status=self.status(typed) if self.status else None,
            tags={name: read(typed) for name, read in self.tags.items()},
            text=tuple(
                searchable(value)[:MAX_TEXT_LENGTH]
                for value in (self.text(typed) if self.text else [])
            ),
            numbers={name: read(typed) for name, read in self.numbers.items()},
        )
