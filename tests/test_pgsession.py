"""guardrails.tools.pgsession: database URLs in every accepted form, masked for display."""

from __future__ import annotations

import pytest

from guardrails.tools.pgsession import ConnectError, DatabaseUrl


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:pw@db:5432/shop",
        "postgres://app:pw@db:5432/shop",
        "postgresql+asyncpg://app:pw@db:5432/shop",
        "postgresql+psycopg://app:pw@db:5432/shop",
    ],
)
def test_every_accepted_scheme_becomes_libpq(url: str) -> None:
    parsed = DatabaseUrl.parse(url)
    assert parsed.libpq == "postgresql://app:pw@db:5432/shop"
    assert parsed.shown == "postgresql://app:***@db:5432/shop"
    assert parsed.password == "pw"


def test_a_password_with_special_characters_is_masked_everywhere() -> None:
    parsed = DatabaseUrl.parse("postgresql://app:p%40ss%2Fw@db/shop")
    assert parsed.password == "p@ss/w"
    assert parsed.shown == "postgresql://app:***@db/shop"
    message = "auth failed for p@ss/w (p%40ss%2Fw)\n\tdetail"
    assert parsed.scrub(message) == "auth failed for *** (***) detail"


def test_sqlalchemys_ssl_becomes_libpqs_sslmode() -> None:
    parsed = DatabaseUrl.parse("postgresql+asyncpg://app@db/shop?ssl=require")
    assert parsed.libpq == "postgresql://app@db/shop?sslmode=require"
    assert parsed.shown == "postgresql://app@db/shop"  # no query: it may carry secrets too
    assert parsed.password is None


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mysql://app:pw@db/shop", "got mysql://..."),
        ("dbname=shop password=pw", "got a string that is not a URL"),
        ("postgresql://app:pw@db:port/shop", "bad port: postgresql://app:***@db:port/shop"),
    ],
)
def test_bad_urls_say_what_a_good_one_looks_like(url: str, expected: str) -> None:
    with pytest.raises(ConnectError) as caught:
        DatabaseUrl.parse(url)
    message = str(caught.value)
    assert expected in message
    assert "postgresql://user:password@host:5432/dbname" in message
    assert ":pw@" not in message
