/* NFIT walk over sub-structures; byte offsets follow ACPI 6.x 5.2.25 (see Linux's actbl1.h). */
#include "nfit.h"
#include "acpi.h"
#include "console.h"
#include "mem.h"

#define NFIT_FIRST 40
#define SUB_TYPE 0
#define SUB_LEN 2

#define NFIT_SPA 0
#define SPA_MIN_LEN 56
#define SPA_RANGE_INDEX 4
#define SPA_GUID 16
#define SPA_BASE 32
#define SPA_LENGTH 40

#define NFIT_MEMDEV 1
#define MEMDEV_LEN 48
#define MEMDEV_HANDLE 4
#define MEMDEV_RANGE_INDEX 12
#define MEMDEV_REGION_INDEX 14
#define MEMDEV_FLAGS 44

#define NFIT_DCR 4
#define DCR_MIN_LEN 32
#define DCR_REGION_INDEX 4
#define DCR_SERIAL 24

#define NFIT_FLUSH 6
#define FLUSH_MIN_LEN 16
#define FLUSH_HANDLE 4
#define FLUSH_HINT_COUNT 8
#define FLUSH_HINTS 16

/* 66F0D379-B4F3-4074-AC43-0D3318B78CDB in the table's byte order. */
static const u8 pm_guid[16] = {0x79, 0xd3, 0xf0, 0x66, 0xf3, 0xb4, 0x74, 0x40,
			       0xac, 0x43, 0x0d, 0x33, 0x18, 0xb7, 0x8c, 0xdb};

struct sub_iter {
	const u8 *table;
	u32 len;
	u32 off;
};

static const u8 *find_nfit(void)
{
	const u8 *t = acpi_find_table("NFIT");
	if (!t)
		say("error no NFIT table in the root table");
	return t;
}

/* The next sub-structure, or NULL at the end or on a malformed length (error printed). */
static const u8 *sub_next(struct sub_iter *it, int *bad)
{
	if (it->off + 4 > it->len)
		return NULL;
	const u8 *s = it->table + it->off;
	u16 slen = rd16(s + SUB_LEN);
	if (slen < 4 || it->off + slen > it->len) {
		error_begin("nfit structure at table offset ");
		out_dec(it->off);
		out_str(" has length ");
		out_dec(slen);
		out_str(", table ends at ");
		out_dec(it->len);
		line_end();
		*bad = 1;
		return NULL;
	}
	it->off += slen;
	return s;
}

static int too_short(const u8 *s, u16 min)
{
	if (rd16(s + SUB_LEN) >= min)
		return 0;
	error_begin("nfit structure type ");
	out_dec(rd16(s + SUB_TYPE));
	out_str(" has length ");
	out_dec(rd16(s + SUB_LEN));
	out_str(", needs at least ");
	out_dec(min);
	line_end();
	return 1;
}

static int flush_fits(const u8 *s)
{
	if (too_short(s, FLUSH_MIN_LEN))
		return 0;
	u32 need = FLUSH_HINTS + 8u * rd16(s + FLUSH_HINT_COUNT);
	if (need <= rd16(s + SUB_LEN))
		return 1;
	error_begin("nfit flush structure lists ");
	out_dec(rd16(s + FLUSH_HINT_COUNT));
	out_str(" hints but has length ");
	out_dec(rd16(s + SUB_LEN));
	line_end();
	return 0;
}

static void print_sub(const u8 *s, u32 *devices)
{
	u16 type = rd16(s + SUB_TYPE);
	line_begin();
	out_str("nfit ");
	switch (type) {
	case NFIT_SPA:
		out_str("spa index=");
		out_dec(rd16(s + SPA_RANGE_INDEX));
		out_str(" base=");
		out_hex(rd64(s + SPA_BASE));
		out_str(" len=");
		out_hex(rd64(s + SPA_LENGTH));
		if (memcmp(s + SPA_GUID, pm_guid, 16) == 0)
			(*devices)++;
		else
			out_str(" type=other");
		break;
	case NFIT_MEMDEV:
		out_str("memdev handle=");
		out_dec(rd32(s + MEMDEV_HANDLE));
		out_str(" spa=");
		out_dec(rd16(s + MEMDEV_RANGE_INDEX));
		out_str(" dcr=");
		out_dec(rd16(s + MEMDEV_REGION_INDEX));
		out_str(" flags=");
		out_hex(rd16(s + MEMDEV_FLAGS));
		break;
	case NFIT_DCR:
		out_str("dcr index=");
		out_dec(rd16(s + DCR_REGION_INDEX));
		out_str(" serial=");
		out_hex(rd32(s + DCR_SERIAL));
		break;
	case NFIT_FLUSH: {
		u16 n = rd16(s + FLUSH_HINT_COUNT);
		out_str("flush handle=");
		out_dec(rd32(s + FLUSH_HANDLE));
		out_str(" hints=");
		out_dec(n);
		for (u16 i = 0; i < n; i++) {
			out_char(' ');
			out_hex(rd64(s + FLUSH_HINTS + 8u * i));
		}
		break;
	}
	default:
		out_str("type=");
		out_dec(type);
		out_str(" len=");
		out_dec(rd16(s + SUB_LEN));
		out_str(" skipped");
	}
	line_end();
}

/* The minimum length of a structure type the probe reads, 0 for types it only lists. */
static u16 min_len(u16 type)
{
	switch (type) {
	case NFIT_SPA:
		return SPA_MIN_LEN;
	case NFIT_MEMDEV:
		return MEMDEV_LEN;
	case NFIT_DCR:
		return DCR_MIN_LEN;
	default:
		return 0;
	}
}

static int sub_valid(const u8 *s)
{
	u16 type = rd16(s + SUB_TYPE);
	if (type == NFIT_FLUSH)
		return flush_fits(s);
	return !too_short(s, min_len(type));
}

static void iter_init(struct sub_iter *it, const u8 *nfit)
{
	it->table = nfit;
	it->len = rd32(nfit + 4);
	it->off = NFIT_FIRST;
}

int nfit_print(void)
{
	const u8 *nfit = find_nfit();
	if (!nfit)
		return -1;
	if (!acpi_checksum_ok(nfit, rd32(nfit + 4)))
		say("nfit checksum=BAD");
	struct sub_iter it;
	iter_init(&it, nfit);
	int bad = 0;
	u32 devices = 0;
	for (const u8 *s; (s = sub_next(&it, &bad));) {
		if (!sub_valid(s)) {
			bad = 1;
			continue;
		}
		print_sub(s, &devices);
	}
	line_begin();
	out_str("nfit devices=");
	out_dec(devices);
	line_end();
	return bad ? -1 : 0;
}

/* The first valid structure of this type whose u16/u32 field at off equals key. */
static const u8 *find_sub(const u8 *nfit, u16 type, u32 off, u32 size, u32 key)
{
	struct sub_iter it;
	iter_init(&it, nfit);
	int bad = 0;
	for (const u8 *s; (s = sub_next(&it, &bad));) {
		if (rd16(s + SUB_TYPE) != type || !sub_valid(s))
			continue;
		u32 v = size == 2 ? rd16(s + off) : rd32(s + off);
		if (v == key)
			return s;
	}
	return NULL;
}

int nfit_nvdimm(u64 dev, struct nvdimm *out)
{
	const u8 *nfit = find_nfit();
	if (!nfit)
		return -1;
	struct sub_iter it;
	iter_init(&it, nfit);
	int bad = 0;
	u64 seen = 0;
	const u8 *spa = NULL;
	for (const u8 *s; (s = sub_next(&it, &bad));) {
		if (rd16(s + SUB_TYPE) != NFIT_SPA || !sub_valid(s) ||
		    memcmp(s + SPA_GUID, pm_guid, 16) != 0)
			continue;
		if (seen++ == dev) {
			spa = s;
			break;
		}
	}
	if (!spa) {
		error_begin("no NVDIMM ");
		out_dec(dev);
		out_str(": the NFIT has ");
		out_dec(seen);
		out_str(" persistent-memory ranges");
		line_end();
		return -1;
	}
	memset(out, 0, sizeof(*out));
	out->base = rd64(spa + SPA_BASE);
	out->len = rd64(spa + SPA_LENGTH);
	const u8 *memdev = find_sub(nfit, NFIT_MEMDEV, MEMDEV_RANGE_INDEX, 2,
				    rd16(spa + SPA_RANGE_INDEX));
	if (!memdev)
		return 0;
	out->has_memdev = 1;
	out->handle = rd32(memdev + MEMDEV_HANDLE);
	const u8 *flush = find_sub(nfit, NFIT_FLUSH, FLUSH_HANDLE, 4, out->handle);
	if (flush) {
		out->hints = flush + FLUSH_HINTS;
		out->hint_count = rd16(flush + FLUSH_HINT_COUNT);
	}
	return 0;
}

u64 nvdimm_hint(const struct nvdimm *d, u32 i)
{
	return rd64(d->hints + 8u * i);
}
