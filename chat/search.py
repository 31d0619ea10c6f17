"""Full-text search over messages, on each database's own index (docs/search.md).

PostgreSQL: the `search_vector` generated column (the `chat_english`
configuration: English stemming, no stop words) and its GIN index. SQLite:
the `chat_message_fts` FTS5 table (Porter stemmer), kept in step by triggers.
Both made by migration 0010; both stem English words ("deploying" finds
"deploy") and both take the same web-search syntax, parsed here once:
words, "phrases" and -exclusions, all of which must hold.

Results are the most relevant of the newest matches (CANDIDATES of them),
then the most recent: a common word among a million messages is ranked
without scoring every message that has it. Who may read what is part of the
query, never a filter afterwards.
"""

from __future__ import annotations

import contextlib
import html
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.contrib.auth.models import User
from django.db import connection

from chat.models import Message, Room
from chat.validation import ChatError

# The index, as migration 0010 makes it and rebuild() makes it again if missing; every statement
# may run twice. PostgreSQL: English stemming without stop words, as SQLite's Porter tokenizer
# ("the api" and "no lunch" are phrases to find on both; PostgreSQL's own "english" drops "the").
_WORD_TOKENS = "asciiword, asciihword, hword_asciipart, word, hword, hword_part"
INDEX_DDL = {
    "postgresql": [
        "DO $$ BEGIN "
        "IF NOT EXISTS (SELECT 1 FROM pg_ts_dict WHERE dictname = 'chat_english_stem') THEN "
        "CREATE TEXT SEARCH DICTIONARY chat_english_stem (TEMPLATE = snowball, LANGUAGE = english); END IF; "
        "IF NOT EXISTS (SELECT 1 FROM pg_ts_config WHERE cfgname = 'chat_english') THEN "
        "CREATE TEXT SEARCH CONFIGURATION chat_english (COPY = english); "
        f"ALTER TEXT SEARCH CONFIGURATION chat_english ALTER MAPPING FOR {_WORD_TOKENS} WITH chat_english_stem; "
        "END IF; END $$",
        "ALTER TABLE chat_message ADD COLUMN IF NOT EXISTS search_vector tsvector "
        "GENERATED ALWAYS AS (to_tsvector('chat_english'::regconfig, body)) STORED",
        "CREATE INDEX IF NOT EXISTS message_search ON chat_message USING GIN (search_vector)",
        # The planner's choice between the GIN index (a rare word) and the primary key walked
        # backwards (a common one) rests on how often each word is used: with the default
        # statistics it takes every word it has not sampled for a common one, and walks the whole
        # table for a rare word (1.7 s at a million messages; 0.3 ms through the index).
        "ALTER TABLE chat_message ALTER COLUMN search_vector SET STATISTICS 10000",
    ],
    "sqlite": [
        "CREATE VIRTUAL TABLE IF NOT EXISTS chat_message_fts USING fts5("
        "body, content='chat_message', content_rowid='id', tokenize='porter unicode61 remove_diacritics 2')",
        "CREATE TRIGGER IF NOT EXISTS chat_message_fts_insert AFTER INSERT ON chat_message BEGIN "
        "INSERT INTO chat_message_fts(rowid, body) VALUES (new.id, new.body); END",
        "CREATE TRIGGER IF NOT EXISTS chat_message_fts_delete AFTER DELETE ON chat_message BEGIN "
        "INSERT INTO chat_message_fts(chat_message_fts, rowid, body) VALUES ('delete', old.id, old.body); END",
        "CREATE TRIGGER IF NOT EXISTS chat_message_fts_update AFTER UPDATE OF body ON chat_message BEGIN "
        "INSERT INTO chat_message_fts(chat_message_fts, rowid, body) VALUES ('delete', old.id, old.body); "
        "INSERT INTO chat_message_fts(rowid, body) VALUES (new.id, new.body); END",
    ],
}
DROP_DDL = {
    "postgresql": [
        "DROP INDEX IF EXISTS message_search",
        "ALTER TABLE chat_message DROP COLUMN IF EXISTS search_vector",
        "DROP TEXT SEARCH CONFIGURATION IF EXISTS chat_english",
        "DROP TEXT SEARCH DICTIONARY IF EXISTS chat_english_stem",
    ],
    "sqlite": [
        "DROP TRIGGER IF EXISTS chat_message_fts_insert",
        "DROP TRIGGER IF EXISTS chat_message_fts_delete",
        "DROP TRIGGER IF EXISTS chat_message_fts_update",
        "DROP TABLE IF EXISTS chat_message_fts",
    ],
}

QUERY_MAX_LENGTH = 200
RESULTS_MAX = 50
# How many of the newest matches are ranked by relevance.
CANDIDATES = 500
SNIPPET_WORDS = 16
# Around a matched word in a snippet, before it is escaped: characters a body never keeps.
_MARK_START, _MARK_END = "\x02", "\x03"


@dataclass(frozen=True)
class Term:
    """One part of a query: a word or a phrase (its words in order), wanted or excluded."""

    words: tuple[str, ...]
    exclude: bool = False


@dataclass(frozen=True)
class Hit:
    message: Message
    snippet: str  # HTML: the text escaped, the matched words in <mark>


_TOKEN = re.compile(r'(-?)"([^"]*)"?|(-?)(\S+)')
_WORD = re.compile(r"\w+", re.UNICODE)


def parse(query: object) -> list[Term]:
    """The terms of a web-search query: `deploy "lunch today" -coffee`. A clear error if there is nothing to find."""
    if not isinstance(query, str) or not query.strip():
        raise ChatError("empty_query", "Type something to search for.")
    if len(query) > QUERY_MAX_LENGTH:
        raise ChatError("query_too_long", f"A search can be at most {QUERY_MAX_LENGTH} characters.")
    if "\x00" in query or not _printable(query):
        raise ChatError("invalid_query", "A search cannot contain NUL characters or unpaired surrogates.")
    terms = []
    for match in _TOKEN.finditer(query):
        phrase_minus, phrase, word_minus, word = match.groups()
        words = tuple(_WORD.findall(phrase if phrase is not None else word))
        if words:  # punctuation alone finds nothing, in either database
            terms.append(Term(words, exclude=bool(phrase_minus or word_minus)))
    if not any(not term.exclude for term in terms):
        raise ChatError("invalid_query", "Search for at least one word (a -word only leaves words out).")
    return terms


def _printable(text: str) -> bool:
    """Text a database takes: no unpaired surrogates (other control characters are only not words)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def search(
    *,
    user: User,
    query: object,
    room: Room | None = None,
    author: User | None = None,
    after: datetime | None = None,
    before: datetime | None = None,
    limit: int = 20,
) -> list[Hit]:
    """The messages `user` may read that match `query`: the most relevant first, then the most recent."""
    terms = parse(query)
    limit = max(1, min(limit, RESULTS_MAX))
    conditions = [
        "m.deleted_at IS NULL",
        # Who may read what: public rooms, and the rooms the user is a member of.
        "(m.room_id IN (SELECT id FROM chat_room WHERE NOT is_private)"
        " OR m.room_id IN (SELECT room_id FROM chat_membership WHERE user_id = %s))",
    ]
    params: list[Any] = [user.pk]
    for column, value in (("room_id", room and room.pk), ("author_id", author and author.pk)):
        if value is not None:
            conditions.append(f"m.{column} = %s")
            params.append(value)
    for operator, moment in ((">=", after), ("<", before)):
        if moment is not None:
            conditions.append(f"m.created_at {operator} %s")
            params.append(connection.ops.adapt_datetimefield_value(moment))
    backend = _postgresql if connection.vendor == "postgresql" else _sqlite
    ranked = backend.ranked(terms, " AND ".join(conditions), params, limit)
    if not ranked:
        return []
    messages = Message.objects.select_related("room", "author").in_bulk([message_id for message_id, _ in ranked])
    return [Hit(messages[message_id], _marked(snippet)) for message_id, snippet in ranked if message_id in messages]


ADMIN_MATCHES_MAX = 1000


def newest_matches(query: object, *, limit: int = ADMIN_MATCHES_MAX) -> list[int]:
    """The ids of the newest messages matching `query` in every room: the admin's search, for staff."""
    terms = parse(query)
    if connection.vendor == "postgresql":
        tsquery, params = _postgresql.tsquery(terms)
        sql = f"SELECT id FROM chat_message WHERE search_vector @@ ({tsquery}) ORDER BY id DESC LIMIT %s"
    else:
        params = [_sqlite.match(terms)]
        sql = "SELECT rowid FROM chat_message_fts WHERE chat_message_fts MATCH %s ORDER BY rowid DESC LIMIT %s"
    with connection.cursor() as cursor:
        cursor.execute(sql, [*params, limit])
        return [row[0] for row in cursor.fetchall()]


REBUILD_BATCH = 20_000


def rebuild(progress: Callable[[int, int], None] | None = None) -> int:
    """Make the index again from every message (`manage.py rebuild_search_index`); return how many were indexed.

    Creates what migration 0010 made if it is missing (a table rebuilt by a later
    SQLite migration loses its triggers), then indexes the bodies in batches by
    id, telling `progress(done, total)` after each.
    """
    total = Message.objects.count()
    last_id = Message.objects.order_by("-pk").values_list("pk", flat=True).first() or 0
    backend = _postgresql if connection.vendor == "postgresql" else _sqlite
    with connection.cursor() as cursor:
        backend.prepare(cursor)
        done = 0
        for low in range(0, last_id, REBUILD_BATCH):
            done += backend.index_batch(cursor, low, low + REBUILD_BATCH)
            if progress is not None:
                progress(min(done, total), total)
        backend.finish(cursor)
    return done


@contextlib.contextmanager
def bulk_load() -> Iterator[None]:
    """Insert many messages (seeddemo) with the index made once afterwards: SQLite's triggers lifted meanwhile.

    For a database nobody else writes to meanwhile: an edit by someone else
    while the triggers are off would not reach the index (rebuild_search_index
    mends that). PostgreSQL's generated column needs nothing: it is computed
    with each row.
    """
    if connection.vendor != "sqlite":
        yield
        return
    before = Message.objects.order_by("-pk").values_list("pk", flat=True).first() or 0
    with connection.cursor() as cursor:
        for trigger in ("insert", "delete", "update"):
            cursor.execute(f"DROP TRIGGER IF EXISTS chat_message_fts_{trigger}")
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            for statement in INDEX_DDL["sqlite"]:
                cursor.execute(statement)
            cursor.execute(
                "INSERT INTO chat_message_fts(rowid, body) SELECT id, body FROM chat_message WHERE id > %s", [before]
            )


def _marked(snippet: str) -> str:
    """Escape a snippet, then turn the database's sentinels around matched words into <mark>."""
    escaped = html.escape(snippet, quote=False)
    marked = re.sub(f"{_MARK_START}([^{_MARK_START}{_MARK_END}]*){_MARK_END}", r"<mark>\1</mark>", escaped)
    return marked.replace(_MARK_START, "").replace(_MARK_END, "")


class _postgresql:
    @staticmethod
    def tsquery(terms: list[Term]) -> tuple[str, list[str]]:
        # websearch_to_tsquery, given the parsed terms again with each one quoted: a phrase of its
        # words (one word is a phrase of one), so that "or" is a word here as it is in SQLite.
        query = " ".join(("-" if term.exclude else "") + '"' + " ".join(term.words) + '"' for term in terms)
        return "websearch_to_tsquery('chat_english', %s)", [query]

    @classmethod
    def ranked(cls, terms: list[Term], where: str, params: list[Any], limit: int) -> list[tuple[int, str]]:
        tsquery, query_params = cls.tsquery(terms)
        headline = (
            f"StartSel={_MARK_START}, StopSel={_MARK_END}, MaxWords={SNIPPET_WORDS}, MinWords={SNIPPET_WORDS // 2}, "
            'ShortWord=2, MaxFragments=1, FragmentDelimiter=" … "'
        )
        # The newest matches along whichever index the planner prefers (the GIN index for a
        # rare word, the primary key backwards for a common one); ranks and headlines for few rows.
        sql = f"""
            WITH newest AS (
                SELECT m.id, m.body, m.search_vector
                FROM chat_message m
                WHERE m.search_vector @@ ({tsquery}) AND {where}
                ORDER BY m.id DESC
                LIMIT {CANDIDATES}
            ),
            best AS (
                SELECT id, body, ts_rank(search_vector, {tsquery}) AS rank
                FROM newest
                ORDER BY rank DESC, id DESC
                LIMIT %s
            )
            SELECT id, ts_headline('chat_english', body, {tsquery}, %s)
            FROM best
            ORDER BY rank DESC, id DESC
        """
        with connection.cursor() as cursor:
            cursor.execute(sql, [*query_params, *params, *query_params, limit, *query_params, headline])
            return [(message_id, snippet) for message_id, snippet in cursor.fetchall()]

    @staticmethod
    def prepare(cursor: Any) -> None:
        for statement in INDEX_DDL["postgresql"]:
            cursor.execute(statement)

    @staticmethod
    def index_batch(cursor: Any, low: int, high: int) -> int:
        # A stored generated column is computed again when its row is written.
        cursor.execute("UPDATE chat_message SET body = body WHERE id > %s AND id <= %s", [low, high])
        return cursor.rowcount

    @staticmethod
    def finish(cursor: Any) -> None:
        cursor.execute("REINDEX INDEX message_search")
        cursor.execute("ANALYZE chat_message")


class _sqlite:
    @staticmethod
    def match(terms: list[Term]) -> str:
        """An FTS5 query: every term a quoted string (so no word is read as an operator), NOT before exclusions."""

        def quoted(term: Term) -> str:
            return '"' + " ".join(term.words).replace('"', '""') + '"'

        wanted = " AND ".join(quoted(term) for term in terms if not term.exclude)
        return " ".join([wanted, *(f"NOT {quoted(term)}" for term in terms if term.exclude)])

    @classmethod
    def ranked(cls, terms: list[Term], where: str, params: list[Any], limit: int) -> list[tuple[int, str]]:
        match = cls.match(terms)
        sql = f"""
            SELECT id FROM (
                SELECT m.id AS id, bm25(chat_message_fts) AS rank
                FROM chat_message_fts f JOIN chat_message m ON m.id = f.rowid
                WHERE chat_message_fts MATCH %s AND {where}
                ORDER BY f.rowid DESC
                LIMIT {CANDIDATES}
            )
            ORDER BY rank, id DESC
            LIMIT %s
        """
        with connection.cursor() as cursor:
            cursor.execute(sql, [match, *params, limit])
            ids = [row[0] for row in cursor.fetchall()]
            if not ids:
                return []
            # Snippets from the index, for these few rows only.
            cursor.execute(
                f"SELECT rowid, snippet(chat_message_fts, 0, %s, %s, '…', {SNIPPET_WORDS}) FROM chat_message_fts "
                f"WHERE chat_message_fts MATCH %s AND rowid IN ({', '.join(['%s'] * len(ids))})",
                [_MARK_START, _MARK_END, match, *ids],
            )
            snippets = dict(cursor.fetchall())
        return [(message_id, snippets.get(message_id, "")) for message_id in ids]

    @staticmethod
    def prepare(cursor: Any) -> None:
        for statement in INDEX_DDL["sqlite"]:
            cursor.execute(statement)
        cursor.execute("INSERT INTO chat_message_fts(chat_message_fts) VALUES ('delete-all')")

    @staticmethod
    def index_batch(cursor: Any, low: int, high: int) -> int:
        cursor.execute(
            "INSERT INTO chat_message_fts(rowid, body) SELECT id, body FROM chat_message WHERE id > %s AND id <= %s",
            [low, high],
        )
        return cursor.rowcount

    @staticmethod
    def finish(cursor: Any) -> None:
        cursor.execute("INSERT INTO chat_message_fts(chat_message_fts) VALUES ('optimize')")
