/* Running the command-line words in order. */
#ifndef PROBE_WORDS_H
#define PROBE_WORDS_H

#include "cmdline.h"

/* Runs every word; returns -1 at the first error (already printed), 0 when all ran. */
int run_words(const struct word_list *list);

#endif
