#!/usr/bin/env bash
# How many messages per second the cluster's one PostgreSQL can store: pgbench runs the statement
# a send runs (chat/services.py _save_with_next_seq: take the room's next seq and insert, in one
# statement), from CLIENTS connections, into ROOMS rooms of its own, for SECONDS.
#
# Usage (with `bin/cluster up` running):  bench/pg_writes.sh [ROOMS] [CLIENTS] [SECONDS]   (1 8 15)
# One room: every send waits for the room's row lock, so the rate is bounded by one commit at a
# time. Many rooms: sends commit side by side, and share the WAL flushes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rooms="${1:-1}" clients="${2:-8}" seconds="${3:-15}"
name="${CLUSTER_NAME:-chat}"
socket="${CLUSTER_DIR:-/tmp/$name-cluster}/pg/socket"
pg_bin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
[ -S "$socket/.s.PGSQL.5432" ] || { echo "No cluster PostgreSQL at $socket: run bin/cluster up." >&2; exit 1; }
psql() { "$pg_bin/psql" -h "$socket" -U postgres -d chat -qAt "$@"; }
tag="pgbench$(date +%s)"

# Its own rooms and author, made as the site makes them, and removed afterwards.
ids="$(bin/cluster manage shell -c "
from django.contrib.auth import get_user_model
from chat import services
author = get_user_model().objects.create_user('$tag')
rooms = [services.room_create(slug=f'$tag-{n}', name=f'pgbench {n}', created_by=author) for n in range($rooms)]
print(author.pk, rooms[0].pk, rooms[-1].pk)
" 2>/dev/null | tail -1)"
read -r author first last <<<"$ids"
cleanup() {
  psql -c "DELETE FROM chat_message WHERE room_id BETWEEN $first AND $last" \
    -c "DELETE FROM chat_membership WHERE room_id BETWEEN $first AND $last" \
    -c "DELETE FROM chat_room WHERE id BETWEEN $first AND $last" \
    -c "DELETE FROM auth_user WHERE id = $author" || echo "could not remove the rooms $first..$last" >&2
}
trap cleanup EXIT

script="$(mktemp)"
chmod 644 "$script"  # pgbench runs as postgres
cat >"$script" <<EOF
\set room random($first, $last)
WITH next AS (UPDATE chat_room SET last_seq = last_seq + 1, last_message_at = now() WHERE id = :room AND NOT is_archived RETURNING last_seq) INSERT INTO chat_message (room_id, author_id, body, created_at, edited_at, deleted_at, seq, nonce, change, html, reply_to_id, pinned_at, reactions, mentions, mentions_room, attachments) SELECT :room, $author, 'A message of the length people write, about sixty characters.', now(), NULL, NULL, next.last_seq, NULL, 0, '<p>A message of the length people write, about sixty characters.</p>', NULL, NULL, '[]', '[]', false, '[]' FROM next;
EOF
echo "pgbench: $rooms room(s), $clients connections, $seconds s, the statement of a send ..."
runuser -u postgres -- "$pg_bin/pgbench" -h "$socket" -U postgres -n -f "$script" -c "$clients" \
  -j "$(( clients < 2 ? 1 : 2 ))" -T "$seconds" chat | grep -E "^(number of transactions actually|latency average|tps)"
rm -f "$script"
