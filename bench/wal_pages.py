#!/usr/bin/env python3
"""Which tables and indexes a SQLite commit writes: reads the frame headers of a WAL file and
maps each page to its b-tree with SQLite's dbstat table.

    python3 bench/wal_pages.py DATA_DIR/quickim.db [DATA_DIR/quickim.db-wal]

Copy both files while the node runs under load (the WAL holds the commits since its last
restart); the page map is read from the database file, so pages the WAL moved may show as '?'.
"""
import collections
import sqlite3
import struct
import sys


def main():
    db = sys.argv[1]
    wal = sys.argv[2] if len(sys.argv) > 2 else db + "-wal"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    owner = {page: name for name, page in con.execute("SELECT name, pageno FROM dbstat")}
    data = open(wal, "rb").read()
    _magic, _version, page_size, _seq, salt1, salt2, _c1, _c2 = struct.unpack(">8I", data[:32])
    commits, current, offset = [], [], 32
    while offset + 24 + page_size <= len(data):
        page, commit_size, s1, s2 = struct.unpack(">4I", data[offset:offset + 16])
        if (s1, s2) != (salt1, salt2):
            break  # frames of an earlier generation of the WAL
        current.append(page)
        if commit_size:
            commits.append(current)
            current = []
        offset += 24 + page_size
    if not commits:
        sys.exit("no complete commit in the WAL")
    frames = sum(map(len, commits))
    print(f"{len(commits)} commits, {frames / len(commits):.1f} pages per commit")
    count = collections.Counter(owner.get(p, "?") for c in commits for p in c)
    for name, n in count.most_common():
        print(f"{name:40} {n / len(commits):6.2f} per commit")


if __name__ == "__main__":
    main()
