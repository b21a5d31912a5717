#!/usr/bin/env bash
# Back up a Nord coordinator's directory (run.json, identity keys, replica log, history, checkpoints)
# while it runs: files are copied as they are, SQLite databases through SQLite's online-backup API (a
# consistent copy even mid-write), then everything is packed into one timestamped .tar.gz.
#
#   backup.sh SRC_DIR DEST_DIR [KEEP]     e.g. backup.sh /var/lib/nord /var/backups/nord 14
#
# Keeps the newest KEEP archives (default 14). The archive holds the private keys: keep DEST_DIR private.
# Restore: stop the service, `tar -xzf ARCHIVE -C /var/lib/nord`, chown -R nord:nord, start it.
set -euo pipefail
umask 077

if [ $# -lt 2 ] || [ $# -gt 3 ]; then
  echo "usage: $0 SRC_DIR DEST_DIR [KEEP]" >&2
  exit 2
fi
src=$(cd "$1" && pwd)
dest=$2
keep=${3:-14}
case $keep in '' | *[!0-9]*) echo "KEEP must be a number, got '$keep'" >&2; exit 2 ;; esac
[ -f "$src/run.json" ] || { echo "$src has no run.json: not a Nord coordinator directory" >&2; exit 2; }

mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
staging=$(mktemp -d "$dest/.staging.XXXXXX")
trap 'rm -rf "$staging"' EXIT

# SQLite databases are copied through SQLite itself (a plain copy may be torn mid-transaction); every other
# file as it is. The prepared corpus under data/ is a cache `nord data prepare` rebuilds.
is_db=(-name '*.sqlite' -o -name '*.sqlite3' -o -name '*.db')
(cd "$src" && find . -path ./data -prune -o -type f ! \( "${is_db[@]}" -o -name '*-wal' -o -name '*-shm' -o -name '*-journal' \) -print0) \
  | (cd "$src" && xargs -0 -r cp --parents -p -t "$staging")
while IFS= read -r -d '' db; do
  mkdir -p "$(dirname "$staging/$db")"
  python3 - "$src/$db" "$staging/$db" <<'PY'
import sqlite3, sys
src = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
dst = sqlite3.connect(sys.argv[2])
src.backup(dst)
dst.close()
src.close()
PY
done < <(cd "$src" && find . -path ./data -prune -o -type f \( "${is_db[@]}" \) -print0)

archive="$dest/nord-$(date -u +%Y%m%dT%H%M%SZ).tar.gz"
tar -czf "$archive.part" -C "$staging" .
mv "$archive.part" "$archive"
echo "$archive"

# Rotation: newest first, drop everything after the first KEEP.
ls -1t "$dest"/nord-*.tar.gz | tail -n +"$((keep + 1))" | xargs -r rm -f
