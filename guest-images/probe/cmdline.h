/* The kernel command line from boot_params, split into the words the probe runs. */
#ifndef PROBE_CMDLINE_H
#define PROBE_CMDLINE_H

#include "types.h"

struct word_list {
	char **words;
	u32 count;
};

/* Copies and splits the command line; selects the words after "--", or, with no "--",
 * every token without '='. Prints "probe: error ..." and returns -1 on failure. */
int cmdline_words(const u8 *boot_params, struct word_list *out);

#endif
