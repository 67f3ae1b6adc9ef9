/* Line output on COM1. Every line the probe prints starts with "probe: ". */
#ifndef PROBE_CONSOLE_H
#define PROBE_CONSOLE_H

#include "types.h"

void console_init(void);
/* Starts a line: prints "probe: ". */
void line_begin(void);
void line_end(void);
void out_char(char c);
void out_str(const char *s);
/* Up to n bytes of s. */
void out_strn(const char *s, usize n);
/* "0x" and lowercase hex digits, no leading zeros. */
void out_hex(u64 v);
void out_dec(u64 v);
/* A whole line: "probe: <s>". */
void say(const char *s);
/* "probe: error <s>" without the line end, so details can follow. */
void error_begin(const char *s);

/* One byte from COM1's receiver, waiting for it. */
u8 in_char(void);

#endif
