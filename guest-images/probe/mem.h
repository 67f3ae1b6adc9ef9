/* The C library pieces gcc may call on its own, plus string helpers for the word parser. */
#ifndef PROBE_MEM_H
#define PROBE_MEM_H

#include "types.h"

void *memset(void *dst, int c, usize n);
void *memcpy(void *dst, const void *src, usize n);
void *memmove(void *dst, const void *src, usize n);
int memcmp(const void *a, const void *b, usize n);
usize strlen(const char *s);
int streq(const char *a, const char *b);

#endif
