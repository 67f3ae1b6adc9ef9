/* Running the command-line words in order. */
#ifndef PROBE_WORDS_H
#define PROBE_WORDS_H

#include "cmdline.h"

/* Runs every word; returns -1 at the first error (already printed), 0 when all ran. */
int run_words(const struct word_list *list);
/* Runs the word at *next (with its arguments) and moves *next past them; -1 on error. */
int run_one_word(const struct word_list *list, u32 *next);

#endif
