/*
 * faultfs: a FUSE passthrough of one directory that fails on command, for pmvm's
 * fault-injection tests.
 *
 *   faultfs DIR MOUNTPOINT [FUSE options, e.g. -f]
 *
 * Every file operation is passed through to DIR. While DIR/.fail-write exists, write requests
 * (including the kernel's writeback of mmap'ed pages) fail with EIO; while DIR/.fail-fsync
 * exists, fsync and fdatasync fail with EIO. The control files are checked on every request,
 * so a test turns a fault on and off by creating and removing them.
 */
#define FUSE_USE_VERSION 31
#define _GNU_SOURCE

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fuse3/fuse.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

static int base_fd = -1;

/* FUSE paths start with '/': make them relative to DIR. */
static const char *rel(const char *path)
{
	while (*path == '/')
		path++;
	return *path ? path : ".";
}

static int failing(const char *control)
{
	return faccessat(base_fd, control, F_OK, 0) == 0;
}

static int ff_getattr(const char *path, struct stat *st, struct fuse_file_info *fi)
{
	int rc = fi ? fstat(fi->fh, st) : fstatat(base_fd, rel(path), st, AT_SYMLINK_NOFOLLOW);
	return rc ? -errno : 0;
}

static int ff_readdir(const char *path, void *buf, fuse_fill_dir_t fill, off_t off,
		      struct fuse_file_info *fi, enum fuse_readdir_flags flags)
{
	(void)off;
	(void)fi;
	(void)flags;
	int fd = openat(base_fd, rel(path), O_RDONLY | O_DIRECTORY);
	if (fd < 0)
		return -errno;
	DIR *d = fdopendir(fd);
	if (!d) {
		close(fd);
		return -errno;
	}
	struct dirent *e;
	while ((e = readdir(d)) != NULL)
		fill(buf, e->d_name, NULL, 0, 0);
	closedir(d);
	return 0;
}

static int ff_open(const char *path, struct fuse_file_info *fi)
{
	int fd = openat(base_fd, rel(path), fi->flags & ~O_NOFOLLOW);
	if (fd < 0)
		return -errno;
	fi->fh = fd;
	return 0;
}

static int ff_create(const char *path, mode_t mode, struct fuse_file_info *fi)
{
	int fd = openat(base_fd, rel(path), fi->flags | O_CREAT, mode);
	if (fd < 0)
		return -errno;
	fi->fh = fd;
	return 0;
}

static int ff_read(const char *path, char *buf, size_t size, off_t off, struct fuse_file_info *fi)
{
	(void)path;
	ssize_t n = pread(fi->fh, buf, size, off);
	return n < 0 ? -errno : (int)n;
}

static int ff_write(const char *path, const char *buf, size_t size, off_t off,
		    struct fuse_file_info *fi)
{
	(void)path;
	if (failing(".fail-write"))
		return -EIO;
	ssize_t n = pwrite(fi->fh, buf, size, off);
	return n < 0 ? -errno : (int)n;
}

static int ff_fsync(const char *path, int datasync, struct fuse_file_info *fi)
{
	(void)path;
	if (failing(".fail-fsync"))
		return -EIO;
	int rc = datasync ? fdatasync(fi->fh) : fsync(fi->fh);
	return rc ? -errno : 0;
}

static int ff_release(const char *path, struct fuse_file_info *fi)
{
	(void)path;
	close(fi->fh);
	return 0;
}

static int ff_truncate(const char *path, off_t size, struct fuse_file_info *fi)
{
	int rc;
	if (fi) {
		rc = ftruncate(fi->fh, size);
	} else {
		int fd = openat(base_fd, rel(path), O_WRONLY);
		if (fd < 0)
			return -errno;
		rc = ftruncate(fd, size);
		close(fd);
	}
	return rc ? -errno : 0;
}

static int ff_unlink(const char *path)
{
	return unlinkat(base_fd, rel(path), 0) ? -errno : 0;
}

static int ff_rename(const char *from, const char *to, unsigned int flags)
{
	if (flags)
		return -EINVAL;
	return renameat(base_fd, rel(from), base_fd, rel(to)) ? -errno : 0;
}

static int ff_statfs(const char *path, struct statvfs *st)
{
	(void)path;
	return fstatvfs(base_fd, st) ? -errno : 0;
}

static const struct fuse_operations ops = {
	.getattr = ff_getattr,
	.readdir = ff_readdir,
	.open = ff_open,
	.create = ff_create,
	.read = ff_read,
	.write = ff_write,
	.fsync = ff_fsync,
	.release = ff_release,
	.truncate = ff_truncate,
	.unlink = ff_unlink,
	.rename = ff_rename,
	.statfs = ff_statfs,
};

int main(int argc, char *argv[])
{
	if (argc < 3) {
		fprintf(stderr, "usage: faultfs DIR MOUNTPOINT [FUSE options]\n");
		return 2;
	}
	base_fd = open(argv[1], O_RDONLY | O_DIRECTORY);
	if (base_fd < 0) {
		perror(argv[1]);
		return 1;
	}
	/* FUSE sees: faultfs MOUNTPOINT [options]. */
	argv[1] = argv[0];
	return fuse_main(argc - 1, argv + 1, &ops, NULL);
}
