#!/usr/bin/env python3
"""Writes an uncompressed newc cpio archive (the initramfs format) from a directory.

Usage: mkcpio.py DIR OUT [NODE...]   NODE is path:c|b:major:minor:mode, e.g. dev/console:c:5:1:600

Deterministic: entries sorted, owned by root, mtime 0. Device nodes are written as archive
entries, so no root rights or mknod are needed on the build host.
"""
import os
import stat
import sys


def header(ino, mode, nlink, size, name, rdev=(0, 0)):
    fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
    return b"070701" + b"".join(b"%08x" % f for f in fields)


def pad(n):
    return b"\0" * ((4 - n % 4) % 4)


def entry(out, ino, mode, nlink, name, data=b"", rdev=(0, 0)):
    encoded = name.encode()
    h = header(ino, mode, nlink, len(data), encoded, rdev) + encoded + b"\0"
    out.write(h + pad(len(h)))
    out.write(data + pad(len(data)))


def main():
    if len(sys.argv) < 3:
        sys.exit("usage: mkcpio.py DIR OUT [path:c|b:major:minor:mode ...]")
    root, dest, nodes = sys.argv[1], sys.argv[2], sys.argv[3:]
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for n in dirnames + sorted(filenames):
            full = os.path.join(dirpath, n)
            paths.append(os.path.relpath(full, root))
    paths.sort()
    ino = 1
    tmp = dest + ".tmp"
    with open(tmp, "wb") as out:
        for rel in paths:
            full = os.path.join(root, rel)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                entry(out, ino, stat.S_IFLNK | 0o777, 1, rel, os.readlink(full).encode())
            elif stat.S_ISDIR(st.st_mode):
                entry(out, ino, stat.S_IFDIR | 0o755, 2, rel)
            elif stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    data = f.read()
                perm = 0o755 if st.st_mode & 0o111 else 0o644
                entry(out, ino, stat.S_IFREG | perm, 1, rel, data)
            else:
                sys.exit(f"mkcpio.py: {full}: not a file, directory or symlink")
            ino += 1
        for spec in nodes:
            try:
                path, kind, major, minor, mode = spec.split(":")
                fmt = {"c": stat.S_IFCHR, "b": stat.S_IFBLK}[kind]
                entry(out, ino, fmt | int(mode, 8), 1, path, rdev=(int(major), int(minor)))
            except (ValueError, KeyError):
                sys.exit(f"mkcpio.py: bad node {spec!r}: expected path:c|b:major:minor:mode")
            ino += 1
        entry(out, 0, 0, 1, "TRAILER!!!")
    os.replace(tmp, dest)


if __name__ == "__main__":
    main()
