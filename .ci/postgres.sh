#!/usr/bin/env bash
# Start a local PostgreSQL server for the test of a search shared through a database, and print its SQLAlchemy URL
# (role l2sp, database l2sp_test). Debian's postgresql package is installed if missing (root and apt-get needed);
# its first cluster is started (a running one is fine). Exits non-zero, printing nothing on stdout, where it cannot.
# L2SP_PG_INSTALL=0: never install, only start what is there.
set -uo pipefail
command -v apt-get >/dev/null && [ "$(id -u)" -eq 0 ] || exit 1
if ! command -v pg_lsclusters >/dev/null || [ -z "$(pg_lsclusters -h 2>/dev/null)" ]; then
  [ "${L2SP_PG_INSTALL:-1}" != 0 ] || exit 1
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql; } >/dev/null 2>&1 || exit 1
fi
read -r ver name port _ < <(pg_lsclusters -h | head -1) || exit 1
pg_ctlcluster "$ver" "$name" start >/dev/null 2>&1 || true  # "already running" is fine
pg_lsclusters -h | awk -v v="$ver" -v n="$name" '$1 == v && $2 == n && $4 == "online" {ok = 1} END {exit !ok}' || exit 1
psql=(runuser -u postgres -- psql -q -X -p "$port" -tA)
[ "$("${psql[@]}" -c "SELECT 1 FROM pg_roles WHERE rolname = 'l2sp'")" = 1 ] \
  || "${psql[@]}" -c "CREATE ROLE l2sp LOGIN PASSWORD 'l2sp'" >&2 || exit 1
[ "$("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname = 'l2sp_test'")" = 1 ] \
  || runuser -u postgres -- createdb -p "$port" -O l2sp l2sp_test >&2 || exit 1
echo "postgresql+psycopg2://l2sp:l2sp@127.0.0.1:$port/l2sp_test"
