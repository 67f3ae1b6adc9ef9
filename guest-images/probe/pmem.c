/* Stores go through volatile pointers so gcc emits exactly the 8-bit and 64-bit moves the
 * README promises, never a memset call or vector code. */
#include "pmem.h"
#include "console.h"
#include "cpu.h"
#include "nfit.h"
#include "paging.h"

#define BYTES_X8 0x0101010101010101ull

static void print_dev_range(const char *word, u64 dev, u64 off, u64 len)
{
	line_begin();
	out_str(word);
	out_str(" dev=");
	out_dec(dev);
	out_str(" off=");
	out_hex(off);
	out_str(" len=");
	out_hex(len);
}

static int check_byte(const char *word, u64 byte)
{
	if (byte <= 0xff)
		return 0;
	error_begin(word);
	out_str(" byte ");
	out_hex(byte);
	out_str(" does not fit in 8 bits");
	line_end();
	return -1;
}

/* Resolves dev and maps [off, off+len) of it; returns its address in *addr. */
static int map_dev_range(const char *word, u64 dev, u64 off, u64 len, u64 *addr)
{
	struct nvdimm d;
	if (nfit_nvdimm(dev, &d))
		return -1;
	if (off > d.len || len > d.len - off) {
		error_begin(word);
		out_str(" dev=");
		out_dec(dev);
		out_str(" off=");
		out_hex(off);
		out_str(" len=");
		out_hex(len);
		out_str(" is beyond the device's ");
		out_hex(d.len);
		out_str(" bytes");
		line_end();
		return -1;
	}
	*addr = d.base + off;
	return len ? map_phys(*addr, len, MAP_WRITEBACK) : 0;
}

static void fill(u64 addr, u64 len, u8 byte)
{
	volatile u8 *p = (volatile u8 *)(usize)addr;
	u64 pattern = byte * BYTES_X8;
	for (; len && ((usize)p & 7); len--)
		*p++ = byte;
	volatile u64 *q = (volatile u64 *)p;
	for (; len >= 64; len -= 64, q += 8) {
		q[0] = pattern;
		q[1] = pattern;
		q[2] = pattern;
		q[3] = pattern;
		q[4] = pattern;
		q[5] = pattern;
		q[6] = pattern;
		q[7] = pattern;
	}
	for (; len >= 8; len -= 8)
		*q++ = pattern;
	for (p = (volatile u8 *)q; len; len--)
		*p++ = byte;
}

/* Index of the first byte in [addr, addr+len) that is not byte, or len if all match. */
static u64 first_mismatch(u64 addr, u64 len, u8 byte)
{
	volatile const u8 *p = (volatile const u8 *)(usize)addr;
	u64 pattern = byte * BYTES_X8;
	u64 i = 0;
	for (; i < len && ((addr + i) & 7); i++)
		if (p[i] != byte)
			return i;
	/* Eight words per test: the emulator's cost is per instruction. */
	for (; i + 64 <= len; i += 64) {
		volatile const u64 *q = (volatile const u64 *)(p + i);
		u64 diff = (q[0] ^ pattern) | (q[1] ^ pattern) | (q[2] ^ pattern) |
			   (q[3] ^ pattern) | (q[4] ^ pattern) | (q[5] ^ pattern) |
			   (q[6] ^ pattern) | (q[7] ^ pattern);
		if (diff)
			break;
	}
	for (; i + 8 <= len; i += 8)
		if (*(volatile const u64 *)(p + i) != pattern)
			break;
	for (; i < len; i++)
		if (p[i] != byte)
			return i;
	return len;
}

int pmem_write(u64 dev, u64 off, u64 len, u64 byte)
{
	u64 addr;
	if (check_byte("write", byte) || map_dev_range("write", dev, off, len, &addr))
		return -1;
	fill(addr, len, (u8)byte);
	print_dev_range("write", dev, off, len);
	out_str(" ok");
	line_end();
	return 0;
}

int pmem_check(u64 dev, u64 off, u64 len, u64 byte)
{
	u64 addr;
	if (check_byte("check", byte) || map_dev_range("check", dev, off, len, &addr))
		return -1;
	u64 at = first_mismatch(addr, len, (u8)byte);
	print_dev_range("check", dev, off, len);
	if (at == len) {
		out_str(" ok");
	} else {
		out_str(" mismatch at ");
		out_hex(off + at);
		out_str(" got ");
		out_hex(*(volatile const u8 *)(usize)(addr + at));
	}
	line_end();
	return 0;
}

/* The hint this CPU uses for dev, mapped uncached: index = initial APIC id % hints. */
static int flush_hint(const char *word, u64 dev, u64 *hint)
{
	struct nvdimm d;
	if (nfit_nvdimm(dev, &d))
		return -1;
	if (!d.hint_count) {
		error_begin(word);
		out_str(" dev=");
		out_dec(dev);
		if (d.has_memdev) {
			out_str(": no flush hints for device handle ");
			out_dec(d.handle);
		} else {
			out_str(": no memdev structure names its SPA range");
		}
		line_end();
		return -1;
	}
	*hint = nvdimm_hint(&d, cpu_apic_id() % d.hint_count);
	return map_phys(*hint, 8, MAP_UNCACHED);
}

static void flush_store(u64 hint)
{
	sfence();
	*(volatile u64 *)(usize)hint = 1;
	sfence();
}

int pmem_flush(u64 dev)
{
	u64 hint;
	if (flush_hint("flush", dev, &hint))
		return -1;
	flush_store(hint);
	line_begin();
	out_str("flush dev=");
	out_dec(dev);
	out_str(" hint=");
	out_hex(hint);
	line_end();
	return 0;
}

int pmem_flushw(u64 dev, u64 width)
{
	u64 hint;
	if (width != 1 && width != 2 && width != 4) {
		error_begin("flushw width ");
		out_dec(width);
		out_str(" is not 1, 2 or 4");
		line_end();
		return -1;
	}
	if (flush_hint("flushw", dev, &hint))
		return -1;
	sfence();
	if (width == 1)
		*(volatile u8 *)(usize)hint = 1;
	else if (width == 2)
		*(volatile u16 *)(usize)hint = 1;
	else
		*(volatile u32 *)(usize)hint = 1;
	sfence();
	line_begin();
	out_str("flushw dev=");
	out_dec(dev);
	out_str(" width=");
	out_dec(width);
	line_end();
	return 0;
}

/* "WORD dev=D n=N done": the end of a loop of flushes. */
static int rounds_done(const char *word, u64 dev, u64 n)
{
	line_begin();
	out_str(word);
	out_str(" dev=");
	out_dec(dev);
	out_str(" n=");
	out_dec(n);
	out_str(" done");
	line_end();
	return 0;
}

int pmem_flushes(u64 dev, u64 n)
{
	u64 addr, hint;
	if (map_dev_range("flushes", dev, 0, 1, &addr) || flush_hint("flushes", dev, &hint))
		return -1;
	volatile u8 *first = (volatile u8 *)(usize)addr;
	for (u64 i = 1; i <= n; i++) {
		/* A different byte each time, so the file shows the last round: n & 0xff. */
		*first = (u8)i;
		flush_store(hint);
	}
	return rounds_done("flushes", dev, n);
}

int pmem_storm(u64 dev, u64 n)
{
	u64 addr, hint;
	if (map_dev_range("storm", dev, 0, 16 * 4096, &addr) || flush_hint("storm", dev, &hint))
		return -1;
	for (u64 i = 1; i <= n; i++) {
		*(volatile u8 *)(usize)(addr + (i % 16) * 4096) = (u8)i;
		flush_store(hint);
	}
	return rounds_done("storm", dev, n);
}

/* The last sequence number `scribble` stored; written after the store it numbers, so a CPU
 * that reads k here knows every store up to k is visible (x86 keeps stores in order). */
static volatile u64 scribbled;

int pmem_scribble(u64 dev, u64 pages)
{
	u64 addr;
	if (pages == 0 || map_dev_range("scribble", dev, 0, pages * 4096, &addr))
		return -1;
	/* Plain stores and nothing else: this CPU never exits to the host. */
	for (u64 k = 1;; k++) {
		*(volatile u64 *)(usize)(addr + (k % pages) * 4096) = k;
		scribbled = k;
	}
}

int pmem_flushseq(u64 dev, u64 n)
{
	u64 hint, before = 0, after = 0;
	/* The scribbler maps its range first; then this CPU maps the hint page. */
	while (scribbled == 0)
		cpu_relax_barrier();
	if (flush_hint("flushseq", dev, &hint))
		return -1;
	for (u64 i = 0; i < n; i++) {
		/* New stores since the last flush, each round. */
		while (scribbled == after)
			cpu_relax_barrier();
		before = scribbled;
		flush_store(hint);
		after = scribbled;
	}
	line_begin();
	out_str("flushseq dev=");
	out_dec(dev);
	out_str(" n=");
	out_dec(n);
	out_str(" before=");
	out_dec(before);
	out_str(" after=");
	out_dec(after);
	line_end();
	return 0;
}
