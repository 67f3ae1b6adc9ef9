/* The probe's C entry point, called by start.S with the boot_params pointer pmvm put in RSI. */
#include "acpi.h"
#include "cmdline.h"
#include "console.h"
#include "cpu.h"
#include "paging.h"
#include "power.h"
#include "words.h"

void probe_main(const u8 *boot_params);

void probe_main(const u8 *boot_params)
{
	console_init();
	paging_init();
	line_begin();
	out_str("start cpu=");
	out_dec(cpu_apic_id());
	line_end();

	struct word_list words;
	/* Without an RSDP, words that need no ACPI still run; the others report the error. */
	acpi_init(boot_params);
	if (cmdline_words(boot_params, &words) == 0 && run_words(&words) == 0)
		say("done");
	acpi_poweroff();
}
