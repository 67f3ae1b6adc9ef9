#include "cmdline.h"
#include "console.h"
#include "paging.h"

#define BP_EXT_CMD_LINE_PTR 0x0c8
#define BP_CMD_LINE_PTR 0x228
#define CMDLINE_MAX 4096
#define MAX_TOKENS 512

static char text[CMDLINE_MAX];
static char *tokens[MAX_TOKENS];

static int is_space(char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

static int has_equals(const char *s)
{
	for (; *s; s++)
		if (*s == '=')
			return 1;
	return 0;
}

/* Copies the NUL-terminated command line into text. */
static int copy_cmdline(const u8 *boot_params)
{
	u64 addr = rd32(boot_params + BP_CMD_LINE_PTR) |
		   (u64)rd32(boot_params + BP_EXT_CMD_LINE_PTR) << 32;
	if (!addr)
		return 0;
	if (map_phys(addr, CMDLINE_MAX, MAP_WRITEBACK))
		return -1;
	const char *src = (const char *)(usize)addr;
	for (u32 i = 0; i < CMDLINE_MAX; i++) {
		text[i] = src[i];
		if (!src[i])
			return 0;
	}
	error_begin("command line at ");
	out_hex(addr);
	out_str(" has no NUL within ");
	out_dec(CMDLINE_MAX);
	out_str(" bytes");
	line_end();
	return -1;
}

int cmdline_words(const u8 *boot_params, struct word_list *out)
{
	if (copy_cmdline(boot_params))
		return -1;
	u32 n = 0;
	for (char *p = text; *p;) {
		while (is_space(*p))
			*p++ = 0;
		if (!*p)
			break;
		if (n == MAX_TOKENS) {
			error_begin("command line has more than ");
			out_dec(MAX_TOKENS);
			out_str(" tokens");
			line_end();
			return -1;
		}
		tokens[n++] = p;
		while (*p && !is_space(*p))
			p++;
	}
	for (u32 i = 0; i < n; i++) {
		if (tokens[i][0] == '-' && tokens[i][1] == '-' && !tokens[i][2]) {
			out->words = tokens + i + 1;
			out->count = n - i - 1;
			return 0;
		}
	}
	/* No "--": drop kernel-style key=value options in place. */
	u32 kept = 0;
	for (u32 i = 0; i < n; i++)
		if (!has_equals(tokens[i]))
			tokens[kept++] = tokens[i];
	out->words = tokens;
	out->count = kept;
	return 0;
}
