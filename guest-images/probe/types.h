/* Fixed-width types and unaligned little-endian reads; the probe has no libc. */
#ifndef PROBE_TYPES_H
#define PROBE_TYPES_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned long usize;

#define NULL ((void *)0)

/* ACPI tables are byte-packed, so fields are read without alignment assumptions. */
static inline u16 rd16(const u8 *p)
{
	return (u16)(p[0] | (p[1] << 8));
}

static inline u32 rd32(const u8 *p)
{
	return (u32)rd16(p) | ((u32)rd16(p + 2) << 16);
}

static inline u64 rd64(const u8 *p)
{
	return (u64)rd32(p) | ((u64)rd32(p + 4) << 32);
}

#endif
